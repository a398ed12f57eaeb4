"""How many bytes a store will take: rows per table × bytes per row, arrays × compression ratio.

Pure functions of shapes and counts (no torch, no disk), so `ingest --dry-run` and the
free-disk check before the first forward pass use the same numbers, and a benchmark or a
README table can print them for a model nobody has downloaded.

Calibration (`tests/store/test_estimate.py` keeps it honest): tiny random GPT-2, GPT-NeoX
and Llama stores of 310 and 1,240 tokens (2-3 layers, d_model 32), written by
`store/files.py` (Parquet, zstd level 6, dictionary encoding) and `store/arrays.py`
(Zarr v3, blosc zstd level 3, bitshuffle). Each table's size was fitted as
`files × bytes_per_file + rows × bytes_per_row`; the per-file part is the footer and the
dictionary pages. Float columns barely compress (about 4 bytes each); sorted or
repeated key columns cost under 2 bytes a row together. Checked at pythia-410m's shape
(random weights, 381 tokens, heads L0,L23; `benchmarks/bench_estimate.py`): every part
within 14%, the total within 4%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from selfrepair.store.schema import ARRAYS
from selfrepair.store.top_tokens import top_count

# table -> (bytes per row, bytes per file), measured as described above.
TABLE_BYTES: dict[str, tuple[float, float]] = {
    "tokens": (27.0, 3400.0),  # 6 float32 + ids + two dictionary-encoded token strings
    "head_effects": (5.5, 1200.0),  # de + token_index (layer/head are runs)
    "mlp_effects": (5.9, 1200.0),
    # 6 float32 (de_base with units) + token_index; condition, unit, unit_kind are runs
    "ablation_effects": (28.5, 1050.0),
    "ablation_top": (38.0, 3430.0),  # as ablation_effects, in small files (rows not in runs; unit strings per file)
    "resample_sources": (8.0, 1000.0),
    "repair_sources": (6.6, 3300.0),  # d_de + token_index; src columns repeat per token (+ unit strings)
    "neuron_effects": (11.5, 2700.0),  # 2 float32 + neuron index + rank (repeats per token) + token_index
    "neuron_totals": (17.6, 3090.0),  # 3 float32 + token_index (+ unit strings per file)
    "attention_top": (10.5, 2900.0),  # rank, positions, weight (+ unit strings)
    "condition_tokens": (12.5, 1200.0),
    # Not calibrated: ablation_top's and repair_sources' measures, whose rows these repeat per counterfactual.
    "counterfactual_runs": (38.0, 3430.0),
    "counterfactual_sources": (6.6, 3300.0),  # 2 float32 + token_index (not calibrated: ablation_effects' floats)
    "head_top_tokens": (7.3, 1300.0),
    "vocab": (3.0, 1000.0),  # token_id + a short string (a 50k BPE vocabulary: ~11 B a row, 0.5 MB)
}

# Bytes per row the output metrics add (ingest/output_metrics.py; absent with --output-metrics none): float32
# columns barely compress (about 4 bytes each), top1_changed is a mostly-false boolean (a fraction of a byte).
METRIC_BYTES: dict[str, float] = {"tokens": 4.0, "ablation_effects": 12.5, "ablation_top": 12.5, "condition_tokens": 8.0}

# Compressed size / raw size of the activations (float16 or float32). Random and real
# activations keep most of their mantissa entropy; only the exponent bits shuffle well.
ARRAY_RATIO = {"resid_pre": 0.88, "resid_final": 0.90, "z": 0.88, "norm_scales": 0.66, "mlp_post_final": 0.90}
# resid_pre's layer 0 is the embedding: rows repeat with the token (no positions added in
# rotary models), so it compresses better (0.42 for tiny NeoX/Llama, 0.9 for GPT-2).
RESID_PRE_LAYER0_RATIO = 0.60
WEIGHT_RATIO = 0.92  # float32 weights
ARRAY_META_BYTES = 800  # zarr.json per array
CHUNK_HEADER_BYTES = 100  # blosc headers per chunk, and the zero padding of a partial last chunk
MANIFEST_BYTES = 5000  # manifest.json without shards
MANIFEST_BYTES_PER_SHARD = 1500  # one shard's entry: files, checksums, chunk checksums

DTYPE_BYTES = {"float16": 2, "float32": 4}


@dataclass(frozen=True)
class ModelShape:
    """The facts of a model that sizes depend on.

    Args:
        n_layers, n_heads, d_model, d_head, d_mlp, d_vocab: the model's dimensions.
        n_norms: norm scales stored per token (ln1/ln2 per layer, then ln_final).
        parallel: attention and MLP read the same residual (the MLP of the ablated layer is not downstream).
    """

    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_norms: int
    parallel: bool


@dataclass(frozen=True)
class RunCounts:
    """The counts of one run's final store.

    Args:
        n_rows, preds_per_row, batch_size: rows, predictions per row and rows per shard.
        draws: number of (ablation, sample) draws (resample draws count once each).
        resample_draws: resample draws (each stores `resample_sources`).
        heads: ablated (layer, head) pairs.
        top_p: fraction of tokens per head with repair and neuron detail.
        neurons_top_k: neurons kept per ablated head and top token.
        attention_top_k: attention sources kept per ablated head and top token.
        sr_heads: ablated heads whose top tokens by sr_mlps also get neuron detail (`--sr-mlps-neurons`).
        conditions: conditions the units are also ablated under (each stores its run's `condition_tokens`).
        counterfactuals: counterfactual re-runs of each ablated head's top tokens (`--counterfactuals`).
        output_metrics: whether the tables hold the output metrics' columns (`--output-metrics`).
        arrays: Zarr activation arrays kept.
        activation_dtype: float16 or float32.
    """

    n_rows: int
    preds_per_row: int
    batch_size: int
    draws: int
    resample_draws: int
    heads: tuple[tuple[int, int], ...]
    top_p: float
    neurons_top_k: int
    arrays: tuple[str, ...]
    activation_dtype: str = "float16"
    attention_top_k: int = 8
    sr_heads: int = 0
    conditions: int = 0
    counterfactuals: int = 0
    output_metrics: bool = True

    @property
    def n_tokens(self) -> int:
        return self.n_rows * self.preds_per_row

    @property
    def n_batches(self) -> int:
        return -(-self.n_rows // self.batch_size)

    @property
    def top_n(self) -> int:
        """Each head's top-p% token count, floor(top_p · N) as `store/top_tokens.py` keeps."""
        return top_count(self.top_p, self.n_tokens)


@dataclass(frozen=True)
class Item:
    """One estimated part of the store: a table (rows), an array (elements) or the weights."""

    kind: str  # "table", "array", "weights" or "manifest"
    name: str
    count: int
    bytes: int


@dataclass
class Estimate:
    items: list[Item] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(i.bytes for i in self.items)

    def by_name(self) -> dict[str, int]:
        return {i.name: i.bytes for i in self.items}

    def lines(self) -> list[str]:
        """A table of every part and the total, for `--dry-run`."""
        out = [f"{'part':<28} {'rows/elements':>16} {'estimated':>12}"]
        for i in self.items:
            out.append(f"{i.kind + ' ' + i.name:<28} {i.count:>16,} {human(i.bytes):>12}")
        out.append(f"{'total':<28} {'':>16} {human(self.total):>12}")
        return out


def human(n: float) -> str:
    """Bytes in decimal units (1 GB = 1e9 bytes), three significant digits."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def downstream_components(shape: ModelShape, layer: int) -> int:
    """Heads after `layer` plus MLPs from `layer` on (after it when attention and MLP are parallel).

    The same set as `ingest/ablate.py`'s `repair_sources` rows for one ablated head and token.
    """
    first_mlp = layer + 1 if shape.parallel else layer
    return (shape.n_layers - 1 - layer) * shape.n_heads + (shape.n_layers - first_mlp)


def _mean_sources(k: int, preds: int) -> float:
    """Mean of min(k, p + 1) over the positions p of a row's predictions."""
    return sum(min(k, p + 1) for p in range(preds)) / max(preds, 1)


def table_rows(shape: ModelShape, run: RunCounts) -> dict[str, tuple[int, int]]:
    """Rows and files of every table in the final store: name -> (rows, files)."""
    n, b = run.n_tokens, run.n_batches
    top = run.top_n
    detail = top > 0 and bool(run.heads)
    neurons = detail and run.neurons_top_k > 0
    neuron_tokens = run.draws * (len(run.heads) + run.sr_heads) * top if neurons else 0
    neuron_files = b * run.draws * (1 + (run.sr_heads > 0)) if neurons else 0
    rows = {
        "tokens": (n, b),
        "head_effects": (n * shape.n_layers * shape.n_heads, b),
        "mlp_effects": (n * shape.n_layers, b),
        "ablation_effects": (run.draws * len(run.heads) * n, b * run.draws),
        "ablation_top": (run.draws * len(run.heads) * top, b * run.draws),
        "resample_sources": (run.resample_draws * run.n_rows, b * run.resample_draws),
        # Only each ablated head's top-p% tokens get repair and neuron detail.
        "repair_sources": (run.draws * top * sum(downstream_components(shape, l) for l, _ in run.heads),
                           b * run.draws if detail else 0),
        # Top k and bottom k by signed ΔDE (every neuron when d_mlp <= 2k), per detail token. Tokens
        # by sr_mlps: an upper bound (those already in the top-p% set by clean DE are not repeated).
        "neuron_effects": (neuron_tokens * min(2 * run.neurons_top_k, shape.d_mlp), neuron_files),
        "neuron_totals": (neuron_tokens, neuron_files),
        # A top token at position p sees p + 1 sources, so it keeps min(k, p + 1): the mean
        # over positions (top tokens fall anywhere in a row). Not exact: it depends on where they fall.
        "attention_top": (round(run.draws * len(run.heads) * top * _mean_sources(run.attention_top_k, run.preds_per_row)),
                          b * run.draws if detail and run.attention_top_k else 0),
        "condition_tokens": (run.conditions * run.draws * n, b * run.draws * run.conditions),
        "counterfactual_runs": (run.counterfactuals * run.draws * len(run.heads) * top,
                                b * run.draws if detail and run.counterfactuals else 0),
        "counterfactual_sources": (run.counterfactuals * run.draws * top
                                   * sum(downstream_components(shape, l) for l, _ in run.heads),
                                   b * run.draws if detail and run.counterfactuals else 0),
        "head_top_tokens": (shape.n_layers * shape.n_heads * top, 1),
        "vocab": (shape.d_vocab, 1),
    }
    return rows


def array_shapes(shape: ModelShape, n_tokens: int) -> dict[str, tuple[int, ...]]:
    """Every Zarr activation array's full shape (the same as the ingest creates)."""
    return {
        "resid_pre": (n_tokens, shape.n_layers, shape.d_model),
        "resid_final": (n_tokens, shape.d_model),
        "z": (n_tokens, shape.n_layers, shape.n_heads, shape.d_head),
        "norm_scales": (n_tokens, shape.n_norms),
        "mlp_post_final": (n_tokens, shape.d_mlp),
    }


def weight_elements(shape: ModelShape) -> int:
    """Elements of W_O, W_U, b_U and the final W_out saved under `weights/`."""
    return (shape.n_layers * shape.n_heads * shape.d_head * shape.d_model + shape.d_model * shape.d_vocab
            + shape.d_vocab + shape.d_mlp * shape.d_model)


def estimate(shape: ModelShape, run: RunCounts) -> Estimate:
    """The bytes of every table, every kept Zarr array, the weights and the manifest.

    Args:
        shape: the model's dimensions.
        run: the counts of the final store.

    Returns:
        An Estimate with one Item per part (tables with rows > 0 only).
    """
    est = Estimate()
    for name, (rows, n_files) in table_rows(shape, run).items():
        if rows <= 0:
            continue
        per_row, per_file = TABLE_BYTES[name]
        per_row += METRIC_BYTES.get(name, 0.0) if run.output_metrics else 0.0
        est.items.append(Item("table", name, rows, round(rows * per_row + n_files * per_file)))
    if run.arrays:
        itemsize = DTYPE_BYTES[run.activation_dtype]
        chunks = run.n_batches  # one chunk per clean batch (chunks span every other dimension)
        for name, full in array_shapes(shape, run.n_tokens).items():
            if name not in run.arrays:
                continue
            elements = math.prod(full)
            ratio = ARRAY_RATIO[name]
            if name == "resid_pre":
                ratio = (RESID_PRE_LAYER0_RATIO + (shape.n_layers - 1) * ratio) / shape.n_layers
            data = elements * itemsize * ratio + chunks * CHUNK_HEADER_BYTES + ARRAY_META_BYTES
            est.items.append(Item("array", name, elements, round(data)))
        elements = weight_elements(shape)
        est.items.append(Item("weights", "W_O,W_U,b_U,W_out", elements, round(elements * 4 * WEIGHT_RATIO + 4 * ARRAY_META_BYTES)))
    n_shards = run.n_batches * (1 + run.draws * (1 + (run.sr_heads > 0)))
    est.items.append(Item("manifest", "manifest.json", n_shards,
                          MANIFEST_BYTES + n_shards * MANIFEST_BYTES_PER_SHARD))
    return est


def select_arrays(spec: str | bool | tuple | list | None) -> tuple[str, ...]:
    """The Zarr arrays an `--activations` value keeps, in `ARRAYS` order.

    Args:
        spec: True/`all`, False/None/`none`, or a comma list of array names and `resid`
            (resid_pre and resid_final).

    Raises:
        ValueError: an unknown name (the message lists the choices).
    """
    if spec is True:
        return tuple(ARRAYS)
    if spec is False or spec is None:
        return ()
    parts = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else [str(p) for p in spec]
    parts = [p for p in parts if p]
    chosen: set[str] = set()
    for p in parts:
        if p == "all":
            chosen |= set(ARRAYS)
        elif p == "none":
            continue
        elif p == "resid":
            chosen |= {"resid_pre", "resid_final"}
        elif p in ARRAYS:
            chosen.add(p)
        else:
            raise ValueError(f"unknown array {p!r}; choose from none, all, resid, {', '.join(ARRAYS)}")
    if "none" in parts and len(parts) > 1:
        raise ValueError(f"'none' cannot be combined with other arrays ({','.join(parts)})")
    return tuple(a for a in ARRAYS if a in chosen)
