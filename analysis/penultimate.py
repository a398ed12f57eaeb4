"""Shared parts of the two penultimate-layer figures (final MLP and its top neurons)."""

from __future__ import annotations

import numpy as np
import polars as pl

from selfrepair.analysis.context import Context, head_label
from selfrepair.analysis.style import LOGIT_UNIT, new_figure


def skip(ctx: Context) -> str | None:
    if ctx.model.n_layers < 2:
        return f"{ctx.model.name} has one layer, so no penultimate layer"
    return None


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
