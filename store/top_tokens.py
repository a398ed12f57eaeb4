"""Each head's top-p% tokens by signed clean DE, computed from the stored `head_effects`.

The rule (also the `top_tokens(p)` SQL macro's): floor(p · N) tokens per head, largest
DE first, ties to the lower token_index. Computed one layer at a time, so a million-token
store never holds all of `head_effects` in memory.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING

import numpy as np

import polars as pl
import pyarrow as pa

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
    paths = ms.table_files("ablation_effects", manifest)
    keep = top_count(top_p, manifest.n_tokens)
    out: dict[tuple[int, int], np.ndarray] = {}
    for layer in sorted({la for la, _ in heads}):
        hs = sorted(h for la, h in heads if la == layer)
        got = (pl.scan_parquet(paths, glob=False)
               .filter((pl.col("ablation") == kind) & (pl.col("sample") == sample) & (pl.col("layer") == layer)
                       & pl.col("head").is_in(hs) & (pl.col("token_index") < manifest.n_tokens))
               .sort(["head", "d_de_mlps", "token_index"], descending=[False, True, False])
               .group_by("head", maintain_order=True).head(keep)
               .select("head", "token_index").collect())
        for h in hs:
            out[(layer, h)] = np.sort(got.filter(pl.col("head") == h)["token_index"].to_numpy()).astype(np.int64)
    return out


def batch_digest(top_sets: dict[tuple[int, int], np.ndarray], heads, tok0: int, tok1: int) -> str:
    """sha256 of the top tokens in [tok0, tok1) of each of `heads` (sorted arrays in `top_sets`).

    An ablation shard stores repair and neuron detail for exactly these tokens; its entry
    records this digest, so a shard whose detail no longer matches the store's top-p% sets
    (after more tokens changed them) is found and redone.
    """
    h = hashlib.sha256()
    # The rule the detail follows: shards of stores whose neuron rows were ranked by abs(ΔDE),
    # without neuron_totals, no longer match and are redone when the store is ingested again.
    h.update(b"neurons: signed rank, top and bottom k, totals;")
    for layer, head in sorted(heads):
        toks = top_sets.get((layer, head), np.empty(0, np.int64))
        lo, hi = np.searchsorted(toks, [tok0, tok1])
        h.update(f"L{layer}H{head}:".encode())
        h.update(np.asarray(toks[lo:hi], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]
