"""Which heads the per-head figures draw by default."""

from __future__ import annotations

import math

import polars as pl


def default_heads(top: pl.DataFrame, n_layers: int, k: int = 4) -> tuple[tuple[int, int], ...]:
    """The k heads with the largest mean top-p% clean DE in the last third of the layers.

    Args:
        top: head_top_self_repair rows of one model (layer, head, de_clean).
        n_layers: the model's layer count.
        k: how many heads.

    Returns:
        (layer, head) pairs, largest DE first (ties: lower layer, then head).
    """
    first = n_layers - math.ceil(n_layers / 3)
    rows = (top.filter(pl.col("layer") >= first)
            .sort(["de_clean", "layer", "head"], descending=[True, False, False])
            .head(k))
    return tuple((int(l), int(h)) for l, h in rows.select("layer", "head").iter_rows())


def latest_layer(layers, n_layers: int) -> int | None:
    """The layer the penultimate-layer figures draw among `layers` (those with ablated heads): the penultimate
    layer n_layers − 2 when present (the authors' choice), else the latest before it, else the last layer;
    None when `layers` is empty."""
    layers = set(layers)
    before = [layer for layer in layers if layer <= n_layers - 2]
    return max(before) if before else (max(layers) if layers else None)


def penultimate_head(top: pl.DataFrame, n_layers: int, chosen: tuple[tuple[int, int], ...],
                     detail=frozenset()) -> tuple[int, int] | None:
    """The head the authors' neuron figures draw: they ablated heads of layer n_layers − 2.

    Its layer is `latest_layer` of the ablated heads' layers, among the heads with neuron detail by
    sr_mlps (`detail`, the ingest's --sr-mlps-neurons) when any of them is ablated. Within it, the first
    chosen head, else the head with the largest mean top-p% clean DE; None when no head is ablated.
    """
    ablated = {(int(l), int(h)) for l, h in top.select("layer", "head").iter_rows()}
    pool = (ablated & set(detail)) or ablated
    layer = latest_layer({l for l, _ in pool}, n_layers)
    if layer is None:
        return None
    for head in chosen:
        if head in pool and head[0] == layer:
            return head
    heads = sorted(h for l, h in pool if l == layer)
    rows = (top.filter((pl.col("layer") == layer) & pl.col("head").is_in(heads))
            .sort(["de_clean", "head"], descending=[True, False]).head(1))
    return (layer, int(rows["head"][0]))
