"""Each unit's top-p% tokens by signed clean DE, computed from the stored `head_effects` and `mlp_effects`.

The rule (also the `top_tokens(p)` and `unit_top_tokens(p)` SQL macros'): floor(p · N) tokens
per unit, largest DE first, ties to the lower token_index. A unit's clean DE is the sum of its
components' (DESIGN.md, "Beyond single heads"): a head's `head_effects` row, an MLP's
`mlp_effects` row, ATTNn the sum over layer n's heads, BLOCKn that plus MLPn, a group the sum
over its heads. Computed one layer (or one unit) at a time, so a million-token store never
holds all of `head_effects` in memory.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING

import numpy as np

import polars as pl
import pyarrow as pa

from selfrepair.store.compacted_files import by_layout
from selfrepair.store.labels import Unit, head_label
from selfrepair.store.manifest import FileEntry, Manifest
from selfrepair.store.model_store import ModelStore

if TYPE_CHECKING:
    from selfrepair.store.writer import Writer


def top_count(top_p: float, n_tokens: int) -> int:
    """Tokens in each head's top-p% set: floor(top_p · n_tokens), the one rule every reader uses."""
    return math.floor(top_p * n_tokens)


def is_current(stored: FileEntry | None, n_tokens: int, top_p: float) -> bool:
    """Whether a stored `head_top_tokens` entry (the manifest's `derived` record, or None) was
    written for this store's token count and top_p, so it still holds each head's top-p% set."""
    return stored is not None and stored.n_tokens == n_tokens and stored.top_p == top_p


def compute(ms: ModelStore, top_p: float, manifest: Manifest | None = None) -> pa.Table:
    """The `head_top_tokens` rows (layer, head, token_index, de) for `top_p` (over `manifest`'s snapshot)."""
    manifest = manifest if manifest is not None else ms.manifest()
    paths = ms.table_files("head_effects", manifest)
    keep = top_count(top_p, manifest.n_tokens)
    layers = pl.scan_parquet(paths, glob=False).select(pl.col("layer").unique()).collect()["layer"].sort().to_list()
    parts = [
        pl.scan_parquet(paths, glob=False).filter(pl.col("layer") == layer)
        .sort(["head", "de", "token_index"], descending=[False, True, False])
        .group_by("head", maintain_order=True).head(keep)
        .select("layer", "head", "token_index", "de").collect()
        for layer in layers
    ]
    return pl.concat(parts).sort(["layer", "head", "token_index"]).to_arrow()


def write(writer: "Writer", top_p: float) -> pa.Table:
    """Compute and commit the derived `head_top_tokens` table through the model's writer; returns its rows."""
    table = compute(writer.ms, top_p, writer.manifest)
    writer.write_derived("head_top_tokens", table, {"n_tokens": writer.manifest.n_tokens, "top_p": top_p})
    return table


def sr_mlps_sets(ms: ModelStore, top_p: float, kind: str, sample: int, heads, manifest: Manifest | None = None
                 ) -> dict[tuple[int, int], np.ndarray]:
    """Each of `heads`' top floor(top_p · N) tokens by sr_mlps (`d_de_mlps`, signed, largest first, ties
    to the lower token_index) in one ablation draw, from the stored `ablation_effects` (sorted arrays).

    The heads' sweeps must be complete (every token stored), as `store/plan.complete_heads` checks.
    """
    manifest = manifest if manifest is not None else ms.manifest()
    keep = top_count(top_p, manifest.n_tokens)
    out: dict[tuple[int, int], np.ndarray] = {}
    for layer in sorted({la for la, _ in heads}):
        hs = sorted(h for la, h in heads if la == layer)
        got = (_head_rows(ms, manifest)
               .filter((pl.col("ablation") == kind) & (pl.col("sample") == sample) & (pl.col("layer") == layer)
                       & pl.col("head").is_in(hs) & (pl.col("token_index") < manifest.n_tokens))
               .sort(["head", "d_de_mlps", "token_index"], descending=[False, True, False])
               .group_by("head", maintain_order=True).head(keep)
               .select("head", "token_index").collect())
        for h in hs:
            out[(layer, h)] = np.sort(got.filter(pl.col("head") == h)["token_index"].to_numpy()).astype(np.int64)
    return out


def _head_rows(ms: ModelStore, manifest: Manifest) -> pl.LazyFrame:
    """The `ablation_effects` rows of head units without a condition (ablation, sample, layer, head,
    token_index, d_de_mlps), over files of either layout (before units: every row is one)."""
    cols = ["ablation", "sample", "layer", "head", "token_index", "d_de_mlps"]
    parts = []
    for names, paths in by_layout(ms.table_files("ablation_effects", manifest)).items():
        frame = pl.scan_parquet(paths, glob=False)
        if "unit" in names:
            frame = frame.filter((pl.col("condition") == "") & (pl.col("unit_kind") == "head"))
        parts.append(frame.select(cols))
    if not parts:
        return pl.LazyFrame(schema={"ablation": pl.String, "sample": pl.Int16, "layer": pl.Int16, "head": pl.Int16,
                                    "token_index": pl.Int32, "d_de_mlps": pl.Float32})
    return pl.concat(parts)


def unit_top_sets(ms: ModelStore, units, top_p: float, manifest: Manifest | None = None) -> dict[str, np.ndarray]:
    """Each unit's top floor(top_p · N) tokens by its signed clean DE, largest first, ties to the lower
    token_index, as sorted int64 arrays keyed by `Unit.label` (a conditioned unit reads its own
    label's: the set of the unit alone).

    Args:
        ms: the model folder.
        units: `Unit`s (store/labels.py).
        top_p: the fraction p.
        manifest: the snapshot to read (default: the folder's current one).
    """
    manifest = manifest if manifest is not None else ms.manifest()
    keep = top_count(top_p, manifest.n_tokens)
    units = {u.label: u for u in units}
    heads = {(u.layer, u.head) for u in units.values() if u.kind == "head"}
    out: dict[str, np.ndarray] = {}
    if heads:  # one head's DE is its head_effects row: one scan per layer, as head_top_tokens
        paths = ms.table_files("head_effects", manifest)
        for layer in sorted({la for la, _ in heads}):
            hs = sorted(h for la, h in heads if la == layer)
            got = (pl.scan_parquet(paths, glob=False).filter((pl.col("layer") == layer) & pl.col("head").is_in(hs))
                   .sort(["head", "de", "token_index"], descending=[False, True, False])
                   .group_by("head", maintain_order=True).head(keep).select("head", "token_index").collect())
            for h in hs:
                out[head_label(layer, h)] = _sorted(got.filter(pl.col("head") == h)["token_index"])
    for label, unit in units.items():
        if unit.kind != "head":
            de = unit_clean_de(ms, unit, manifest)
            top = de.sort(["de", "token_index"], descending=[True, False]).head(keep)
            out[label] = _sorted(top["token_index"])
    return out


def unit_clean_de(ms: ModelStore, unit: Unit, manifest: Manifest) -> pl.DataFrame:
    """(token_index, de): the unit's clean DE on every token, the sum of its components' in float64."""
    parts = []
    pairs = unit.heads(manifest.model.n_heads)
    if pairs:
        layers = sorted({la for la, _ in pairs})
        parts.append(pl.scan_parquet(ms.table_files("head_effects", manifest), glob=False)
                     .filter(pl.col("layer").is_in(layers))
                     .filter(pl.any_horizontal([(pl.col("layer") == la) & (pl.col("head") == h) for la, h in pairs]))
                     .select("token_index", pl.col("de").cast(pl.Float64)))
    if unit.mlps():
        parts.append(pl.scan_parquet(ms.table_files("mlp_effects", manifest), glob=False)
                     .filter(pl.col("layer").is_in(list(unit.mlps())))
                     .select("token_index", pl.col("de").cast(pl.Float64)))
    return pl.concat(parts).group_by("token_index").agg(pl.col("de").sum()).collect()


def _sorted(col: pl.Series) -> np.ndarray:
    return np.sort(col.to_numpy()).astype(np.int64)


def _key(unit) -> str:
    """A top set's key: a unit's label (a (layer, head) pair is the head unit's; a label is itself)."""
    if isinstance(unit, str):
        return unit
    return unit.label if isinstance(unit, Unit) else head_label(*unit)


def _order(unit) -> tuple:
    return (unit.layer, unit.head, unit.kind != "head", unit.label) if isinstance(unit, Unit) else (*unit, False, "")


def batch_digest(top_sets: dict, units, tok0: int, tok1: int) -> str:
    """sha256 of the top tokens in [tok0, tok1) of each of `units` (sorted arrays in `top_sets`).

    Args:
        top_sets: label (or (layer, head)) -> sorted token indices.
        units: `Unit`s or (layer, head) pairs.

    An ablation shard stores repair and neuron detail for exactly these tokens; its entry
    records this digest, so a shard whose detail no longer matches the store's top-p% sets
    (after more tokens changed them) is found and redone. A head unit hashes as its (layer,
    head) pair did before units, so shards written then stay valid.
    """
    sets = {_key(k): v for k, v in top_sets.items()}
    h = hashlib.sha256()
    # The rule the detail follows: shards of stores whose neuron rows were ranked by abs(ΔDE),
    # without neuron_totals, no longer match and are redone when the store is ingested again.
    h.update(b"neurons: signed rank, top and bottom k, totals;")
    for unit in sorted(units, key=_order):
        toks = sets.get(_key(unit), np.empty(0, np.int64))
        lo, hi = np.searchsorted(toks, [tok0, tok1])
        h.update(f"{_key(unit)}:".encode())
        h.update(np.asarray(toks[lo:hi], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def shard_digest(top_sets: dict, units, tok0: int, tok1: int, counterfactuals=()) -> str:
    """An ablation shard's `top_sha`: `batch_digest`, and the counterfactuals its top tokens were re-run under.

    Without counterfactuals it is `batch_digest` itself, so shards written before them stay valid; a run
    that asks for counterfactuals redoes the shards that lack them.
    """
    digest = batch_digest(top_sets, units, tok0, tok1)
    if not counterfactuals:
        return digest
    return hashlib.sha256(f"{digest};counterfactuals {','.join(counterfactuals)}".encode()).hexdigest()[:16]
