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


def penultimate_head(top: pl.DataFrame, n_layers: int, chosen: tuple[tuple[int, int], ...]) -> tuple[int, int] | None:
    """The head the authors' neuron figures draw: they ablated heads of layer n_layers − 2.

    The first chosen head of that layer, else that layer's head with the largest mean top-p%
    clean DE; None for a one-layer model or when the layer has no ablated head.
    """
    layer = n_layers - 2
    if layer < 0:
        return None
    for head in chosen:
        if head[0] == layer:
            return head
    rows = top.filter(pl.col("layer") == layer).sort(["de_clean", "head"], descending=[True, False]).head(1)
    return (layer, int(rows["head"][0])) if rows.height else None
