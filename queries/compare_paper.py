"""A store's per-head self-repair means beside the paper's published ones (Rushing & Nanda 2024).

The reference CSV (`queries/reference/`, see its README) holds the authors' per-head means
over each head's top 2% tokens by signed clean DE (`top2pct`, four models) and over all
tokens (`all_tokens`, two models). Any CSV of the same columns may stand in for it (another
run's numbers, exported from another store): its `model` column names store models by
folder, manifest name or Hugging Face id (or, for the paper's four, any of their aliases). `compare` runs the store's named queries for the same
token sets, puts each head's store mean beside the paper's, and gives per-layer means of both
with their difference; heads off by more than the tolerance are listed.

    >>> with Store.open("stores") as s:
    ...     result = compare(s, model="pythia-160m")
    >>> result.agrees, result.layers, result.heads
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from selfrepair.errors import ConfigError, QueryError
from selfrepair.queries import named, requests, safety
from selfrepair.queries.store import Store
from selfrepair.store.inventory import Inventory
from selfrepair.store.manifest import ModelFacts
from selfrepair.store.top_tokens import top_count

REFERENCE_CSV = Path(__file__).parent / "reference" / "paper_breakdown_per_head.csv"
DEFAULT_TOLERANCE = 0.05  # logits
PAPER_TOKENS, PAPER_SEQ_LEN = "~1 M", 128

# The paper's model names and every name a store may give them (folder, manifest name or
# Hugging Face id). Kept here rather than read from ingest/models.py's registry: queries/
# stays free of the ingest layer (a test checks the two agree).
PAPER_MODELS: dict[str, tuple[str, ...]] = {
    "pythia-160m": ("pythia-160m", "EleutherAI/pythia-160m", "EleutherAI--pythia-160m"),
    "pythia-410m": ("pythia-410m", "EleutherAI/pythia-410m", "EleutherAI--pythia-410m"),
    "gpt2-small": ("gpt2-small", "gpt2", "openai-community/gpt2", "openai-community--gpt2"),
    "gpt2-medium": ("gpt2-medium", "openai-community/gpt2-medium", "openai-community--gpt2-medium"),
}


@dataclass(frozen=True)
class Quantity:
    """One compared number.

    Args:
        paper: the reference CSV's column.
        store: the column of one of the selection's store queries that it is compared with.
        label: its name in the output.
    """

    paper: str
    store: str
    label: str


# Comparing another column is one more entry here. The paper's per-token clipped shares
# (`percent_*_of_DE_tokenclipped`) are not compared yet: add a Quantity naming the CSV column
# and the column of the named query that computes them, and add that query to each
# Selection's `queries` (their results are joined on layer and head).
QUANTITIES = (
    Quantity("DE_clean", "de_clean", "DE"),
    Quantity("DE_ablated", "de_ablated", "DE_ablated"),
    Quantity("delta_logit", "d_logit", "delta_logit"),
    Quantity("self_repair", "sr", "SR"),
    Quantity("SR_from_heads", "sr_heads", "SR_heads"),
    Quantity("SR_from_MLPs", "sr_mlps", "SR_MLPs"),
    Quantity("SR_from_LN", "sr_ln", "SR_LN"),
)


@dataclass(frozen=True)
class Selection:
    """One token set of the paper.

    Args:
        name: the CSV's `token_selection` value.
        queries: named queries giving the store's per-head means (joined on layer and head).
        p: the top fraction of tokens per head (None: every token).
    """

    name: str
    queries: tuple[str, ...]
    p: float | None


SELECTIONS = (
    Selection("top2pct", ("head_top_self_repair",), 0.02),
    Selection("all_tokens", ("head_self_repair",), None),
)
KEY_COLUMNS = ("token_selection", "model", "layer", "head", "n_layers")
LAYER_COLUMNS = ("model", "tokens", "layer", "quantity", "store", "paper", "diff", "agrees")
HEAD_COLUMNS = ("model", "tokens", "head", "quantity", "store", "paper", "diff")


@dataclass
class Comparison:
    """The result of `compare`.

    Args:
        layers: one row per model, token set, layer and quantity (LAYER_COLUMNS): mean over
            the layer's heads of the store's and the paper's per-head means, their difference
            and whether it is within the tolerance.
        heads: every (head, quantity) off by more than the tolerance (HEAD_COLUMNS); a head the
            store lacks has an empty store value.
        notes: what was compared, for the reader.
        tolerance: in logits.
    """

    layers: pl.DataFrame
    heads: pl.DataFrame
    notes: list[str] = field(default_factory=list)
    tolerance: float = DEFAULT_TOLERANCE

    @property
    def agrees(self) -> bool:
        return self.heads.is_empty()


def load_reference(path: str | Path = REFERENCE_CSV) -> pl.DataFrame:
    """The reference CSV, checked: its key columns, every compared column numeric, no repeated head.

    Raises:
        ConfigError: the file is missing, unreadable or malformed (one line naming it).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"reference file {path} not found")
    try:
        df = pl.read_csv(path, infer_schema_length=None)
    except (OSError, pl.exceptions.PolarsError) as e:
        raise ConfigError(f"reference file {path} cannot be read as CSV: {safety.one_line(e)}") from None
    missing = [c for c in (*KEY_COLUMNS, *(q.paper for q in QUANTITIES)) if c not in df.columns]
    if missing:
        raise ConfigError(f"reference file {path} lacks column {missing[0]!r}")
    numeric = ["layer", "head", "n_layers", *(q.paper for q in QUANTITIES)]
    bad = [c for c in numeric if not df[c].dtype.is_numeric() or df[c].null_count()
           or (df[c].dtype.is_float() and not df[c].is_finite().all())]
    if df.is_empty():
        raise ConfigError(f"reference file {path} has no rows")
    if bad:
        raise ConfigError(f"reference file {path}: column {bad[0]!r} has empty or non-numeric values")
    if df["model"].null_count() or df["token_selection"].null_count():
        raise ConfigError(f"reference file {path}: a row has no model or token_selection")
    known = [s.name for s in SELECTIONS]
    unknown = sorted(set(df["token_selection"].cast(pl.String)) - set(known))
    if unknown:
        raise ConfigError(f"reference file {path}: token_selection {unknown[0]!r} is not one of {', '.join(known)}")
    df = df.with_columns(pl.col("model", "token_selection").cast(pl.String))
    for c in ("layer", "head", "n_layers"):
        if ((df[c] < 0) | (df[c].cast(pl.Float64) != df[c].cast(pl.Float64).round(0))).any():
            raise ConfigError(f"reference file {path}: column {c!r} must hold whole numbers >= 0")
    layers = df.group_by("model").agg(pl.col("n_layers").n_unique().alias("k"), pl.col("n_layers").first(),
                                      pl.col("layer").max().alias("top"))
    odd = layers.filter((pl.col("k") > 1) | (pl.col("top") >= pl.col("n_layers")))
    if odd.height:
        raise ConfigError(f"reference file {path}: model {odd['model'][0]!r} has layers outside its n_layers "
                          "(or more than one n_layers)")
    if df.select(KEY_COLUMNS[:4]).is_duplicated().any():
        raise ConfigError(f"reference file {path} lists a (token_selection, model, layer, head) twice")
    return df


def paper_model(folder: str, model: ModelFacts) -> str | None:
    """The paper's name for a store model (by HF id, manifest name or folder), or None."""
    names = {folder, model.name, model.hf_id}
    return next((paper for paper, aliases in PAPER_MODELS.items() if names & set(aliases)), None)


def reference_model(folder: str, model: ModelFacts, known: set[str]) -> str | None:
    """The reference's name for a store model: its folder, manifest name or Hugging Face id when the
    reference has that name, else the paper's name for it when the reference has that; None otherwise."""
    for name in (folder, model.name, model.hf_id):
        if name in known:
            return name
    paper = paper_model(folder, model)
    return paper if paper in known else None


def compare(store: Store, model: str | None = None, ablation: str = "resample", sample: int = 0,
            tolerance: float = DEFAULT_TOLERANCE, reference: str | Path = REFERENCE_CSV) -> Comparison:
    """Compare a store's per-head and per-layer means with the paper's.

    Args:
        store: the open store.
        model: one model folder (None: every model of the store that the reference has).
        ablation, sample: the stored ablation and draw compared (the paper's are resample).
        tolerance: the largest agreeing difference, in logits.
        reference: the reference CSV.

    Raises:
        ConfigError: a bad tolerance or reference file, or no model of the store is in it.
        QueryError: the model, ablation or draw is not stored, or the model's shape differs.
    """
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise ConfigError(f"tolerance {tolerance!r} must be a positive number of logits")
    ref = load_reference(reference)
    is_paper = Path(reference).resolve() == REFERENCE_CSV.resolve()
    whose = "the paper's reference" if is_paper else f"the reference {Path(reference).name}"
    pairs = _models(store, model, set(ref["model"]), whose)
    notes = [f"reference: {reference}; tolerance {tolerance:g} logits"]
    if ablation != "resample" and is_paper:
        notes.append(f"note: the paper's numbers are resample ablations; this compares {ablation}")
    notes += [f"skipped {folder}: not a model of {whose}" for folder, paper in pairs if paper is None]
    layers, heads = [], []
    inventories = store.inventories
    for folder, paper in [(f, p) for f, p in pairs if p is not None]:
        inventory = next(i for i in inventories if i.model == folder)
        requests.check(inventories, {"ablation": ablation, "sample": sample}, model=folder)
        for sel in SELECTIONS:
            rows = ref.filter((pl.col("token_selection") == sel.name) & (pl.col("model") == paper))
            if rows.is_empty():
                continue
            _check_shape(inventory, paper, rows, "the paper's" if is_paper else "the reference's")
            if sel.p is not None:
                requests.check(inventories, {"p": sel.p}, model=folder)
            joined = _joined(_store_values(store, folder, sel, ablation, sample), rows)
            joined = joined.with_columns(model=pl.lit(folder), tokens=pl.lit(sel.name))
            layers.append(_layer_means(joined, tolerance))
            heads.append(_off_heads(joined, tolerance))
        notes.append(_scale_note(folder, paper, inventory, ablation, sample) if is_paper else
                     f"{folder} (the reference's {paper}): {ablation} draw {sample}; the store has "
                     f"{inventory.n_tokens:,} tokens ({inventory.n_rows:,} rows of {inventory.seq_len})")
    if is_paper:
        notes.append(f"exact agreement needs the paper's rows and resample pairing (`selfrepair ingest --preset paper`, "
                 f"{PAPER_TOKENS} tokens of NeelNanda/pile-10k in rows of {PAPER_SEQ_LEN}); otherwise expect "
                 "per-layer means within a few hundredths of a logit")
    return Comparison(_ordered(layers, LAYER_COLUMNS), _ordered(heads, HEAD_COLUMNS), notes, tolerance)


def _models(store: Store, model: str | None, known: set[str], whose: str) -> list[tuple[str, str | None]]:
    """(folder, the reference's name or None) for the chosen model, or for every model of the store."""
    if model is not None:
        name = reference_model(model, store.manifest(model).model, known)  # an unknown folder raises StoreNotFound
        if name is None:
            raise ConfigError(f"model {model!r} is not in {whose} (it has {', '.join(sorted(known))})")
        return [(model, name)]
    pairs = [(f, reference_model(f, store.manifest(f).model, known)) for f in store.models]
    if all(p is None for _, p in pairs):
        raise ConfigError(f"no model of this store ({', '.join(store.models)}) is in {whose} "
                          f"(it has {', '.join(sorted(known))})")
    return pairs


def _check_shape(inventory: Inventory, paper: str, rows: pl.DataFrame, whose: str = "the paper's") -> None:
    n_layers, n_heads = int(rows["n_layers"].max()), int(rows["head"].max()) + 1
    if (inventory.n_layers, inventory.n_heads) != (n_layers, n_heads):
        raise QueryError(f"model {inventory.model!r} has {inventory.n_layers} layers × {inventory.n_heads} heads; "
                         f"{whose} {paper} has {n_layers} × {n_heads}")


def _store_values(store: Store, folder: str, sel: Selection, ablation: str, sample: int) -> pl.DataFrame:
    """The store's per-head means for one token set: layer, head and each quantity's column."""
    values = {"p": sel.p, "ablation": ablation, "sample": sample}
    frame = None
    for name in sel.queries:
        wanted = {p.name for p in named.get_query(name).params}
        df = store.query(name, **{k: v for k, v in values.items() if k in wanted})
        df = df.filter(pl.col("model") == folder)
        df = df.select("layer", "head", *[q.store for q in QUANTITIES if q.store in df.columns])
        frame = df if frame is None else frame.join(df, on=["layer", "head"], how="full", coalesce=True)
    missing = [q.store for q in QUANTITIES if q.store not in frame.columns]
    if missing:
        raise QueryError(f"no query of token set {sel.name} ({', '.join(sel.queries)}) gives column {missing[0]!r}")
    return frame


def _joined(values: pl.DataFrame, rows: pl.DataFrame) -> pl.DataFrame:
    """One row per paper head and quantity: store (null when not stored), paper, diff."""
    order = {q.label: i for i, q in enumerate(QUANTITIES)}

    def long(df: pl.DataFrame, column: str, value: str) -> pl.DataFrame:
        df = df.select(pl.col("layer", "head").cast(pl.Int64),
                       *[pl.col(getattr(q, column)).cast(pl.Float64).alias(q.label) for q in QUANTITIES])
        return df.unpivot(index=["layer", "head"], variable_name="quantity", value_name=value)

    return (long(rows, "paper", "paper")
            .join(long(values, "store", "store"), on=["layer", "head", "quantity"], how="left")
            .with_columns(diff=pl.col("store") - pl.col("paper"),
                          q_order=pl.col("quantity").replace_strict(order, return_dtype=pl.Int64)))


def _layer_means(joined: pl.DataFrame, tolerance: float) -> pl.DataFrame:
    # Both sides over the heads the store holds, so a head not stored does not shift the paper's mean.
    stored = joined.filter(pl.col("store").is_not_null())
    return (stored.group_by("model", "tokens", "layer", "quantity", "q_order")
            .agg(pl.col("store").mean(), pl.col("paper").mean())
            .with_columns(diff=pl.col("store") - pl.col("paper"))
            .with_columns(agrees=pl.col("diff").abs() <= tolerance, position=pl.col("layer")))


def _off_heads(joined: pl.DataFrame, tolerance: float) -> pl.DataFrame:
    off = joined.filter(pl.col("store").is_null() | (pl.col("diff").abs() > tolerance))
    return off.with_columns(head=pl.format("L{}H{}", "layer", "head"),
                            position=pl.col("layer") * 10_000 + pl.col("head"))


def _ordered(parts: list[pl.DataFrame], columns: tuple[str, ...]) -> pl.DataFrame:
    """Concatenated in (model, token set, layer or head, quantity) order, with only `columns`."""
    sel_order = {s.name: i for i, s in enumerate(SELECTIONS)}
    df = pl.concat(parts).with_columns(t_order=pl.col("tokens").replace_strict(sel_order, return_dtype=pl.Int64))
    return df.sort("model", "t_order", "position", "q_order").select(columns)


def _scale_note(folder: str, paper: str, inv: Inventory, ablation: str, sample: int) -> str:
    top = top_count(SELECTIONS[0].p, inv.n_tokens)
    return (f"{folder} (the paper's {paper}): {ablation} draw {sample}; the store has {inv.n_tokens:,} tokens "
            f"({inv.n_rows:,} rows of {inv.seq_len}; top 2%: {top:,} tokens per head), the paper "
            f"{PAPER_TOKENS} tokens in rows of {PAPER_SEQ_LEN}")

