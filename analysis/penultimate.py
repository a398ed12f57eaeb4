"""Shared parts of the penultimate-layer figures (final MLP and its top neurons).

The authors ablated heads of the penultimate layer (n_layers − 2). A store whose ingest ablated
none there is drawn at the latest layer that has ablated heads (`heads.latest_layer`), and the
title says which layer and why, instead of leaving the figure undrawn.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from selfrepair.analysis.context import Context, head_label
from selfrepair.analysis.heads import latest_layer
from selfrepair.analysis.style import LOGIT_UNIT, new_figure


def skip(ctx: Context) -> str | None:
    if ctx.model.n_layers < 2:
        return f"{ctx.model.name} has one layer, so no penultimate layer"
    if layer(ctx) is None:
        return f"{ctx.model.name} has no head ablated alone in this draw"
    return None


def layer(ctx: Context) -> int | None:
    """The layer of ablated heads drawn: the penultimate one, else the latest with ablated heads."""
    return latest_layer(ctx.model.head_layers, ctx.model.n_layers)


def runs(ctx: Context, **params) -> list[dict]:
    """The query's one run: the drawn layer and `params`."""
    return [{"layer": layer(ctx)} | params]


def layer_text(ctx: Context, drawn: int | None = None, why: str = "ablated heads") -> str:
    """`penultimate layer 28`, or `layer 27, the latest with ablated heads (none in the penultimate layer 28)`."""
    drawn = layer(ctx) if drawn is None else drawn
    penultimate = ctx.model.n_layers - 2
    if drawn == penultimate:
        return f"penultimate layer {drawn}"
    return f"layer {drawn}, the latest with {why} (none in the penultimate layer {penultimate})"


def paired_bars(df: pl.DataFrame, bars: tuple[tuple[str, str], ...], share: str, share_label: str, title: str):
    """Two bars per head (columns of `bars`) with the share column printed above each pair."""
    fig, axes = new_figure(figsize=(max(7.5, 0.6 * df.height + 2), 4.5))
    ax = axes[0, 0]
    x = np.arange(df.height)
    for i, (column, label) in enumerate(bars):
        ax.bar(x + (i - 0.5) * 0.4, df[column], width=0.4, label=label)
    top = np.nanmax(np.abs(np.concatenate([df[c].to_numpy() for c, _ in bars]))) if df.height else 1.0
    for xi, value in zip(x, df[share]):
        text = "n/a" if value is None or not np.isfinite(value) else f"{value:.0%}"
        ax.text(xi, top * 1.05, text, ha="center", va="bottom", fontsize=7)
    ax.set_ylim(top=top * 1.2 if top > 0 else None)
    ax.set_xticks(x, [head_label(l, h) for l, h in zip(df["layer"], df["head"])], rotation=90 if df.height > 12 else 0)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel(f"ablated head (numbers above: {share_label})")
    ax.set_ylabel(f"mean over the head's top p% tokens ({LOGIT_UNIT})")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return fig
