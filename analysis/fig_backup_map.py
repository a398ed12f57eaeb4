"""Backup map: which downstream heads and MLPs make up each ablated head's loss."""

from __future__ import annotations

import numpy as np
import polars as pl
from matplotlib.colors import Normalize

from selfrepair.analysis.context import Context, head_label
from selfrepair.analysis.spec import FigureSpec
from selfrepair.analysis.style import attach, caption, new_figure

MAX_LABELS = 32  # per axis; beyond, every k-th label (at 8 pt, they stay legible)


def matrix(df: pl.DataFrame):
    """share as a (ablated head × downstream component) array, rows and columns sorted by depth."""
    rows = df.select("layer", "head").unique().sort("layer", "head")
    # MLP of a layer after its heads; src_head is -1 for MLPs.
    cols = (df.select("src_layer", "src_kind", "src_head", "component").unique()
            .with_columns((pl.col("src_kind") == "mlp").alias("is_mlp")).sort("src_layer", "is_mlp", "src_head"))
    row_index = {(l, h): i for i, (l, h) in enumerate(rows.iter_rows())}
    col_index = {c: j for j, c in enumerate(cols["component"])}
    grid = np.full((rows.height, cols.height), np.nan)
    for layer, head, component, share in df.select("layer", "head", "component", "share").iter_rows():
        grid[row_index[(layer, head)], col_index[component]] = np.nan if share is None else share
    return grid, [head_label(l, h) for l, h in rows.iter_rows()], cols["component"].to_list()


def _ticks(labels: list[str]):
    step = max(1, int(np.ceil(len(labels) / MAX_LABELS)))
    return list(range(0, len(labels), step)), labels[::step]


def plot(df: pl.DataFrame, ctx: Context):
    """fig_backup_map as a heatmap of share, diverging around 0."""
    grid, row_labels, col_labels = matrix(df)
    size = min(16.0, 6 + 0.2 * min(MAX_LABELS, max(len(row_labels), len(col_labels))))
    fig, axes = new_figure(figsize=(size + 1.5, size))
    ax = axes[0, 0]
    ax.grid(False)
    finite = np.abs(grid[np.isfinite(grid)])
    bound = float(np.quantile(finite, 0.99)) if finite.size else 1.0
    image = ax.imshow(grid, cmap="RdBu_r", norm=Normalize(-(bound or 1.0), bound or 1.0), aspect="auto",
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, label="share of the ablated head's DE, mean(ΔDE) / mean(DE) (ratio)")
    ticks, labels = _ticks(row_labels)
    ax.set_yticks(ticks, labels, fontsize=8)
    ticks, labels = _ticks(col_labels)
    ax.set_xticks(ticks, labels, fontsize=8, rotation=90)
    ax.set_xlabel("downstream component (head or MLP)")
    ax.set_ylabel("ablated head")
    ax.set_title(f"Backup map: downstream repair of each ablated head\n{ctx.facts()}")
    caption(fig, "Red: the component's DE rose and made up part of the loss (a backup); blue: it fell. Means over "
                 "the ablated head's top p% tokens (the ingest's top_p, repair_sources), colour clipped at the 99th "
                 "percentile of |share|.")
    return attach(fig, df)


FIGURE = FigureSpec(
    name="fig_backup_map",
    title="Backup-head map",
    query="fig_backup_map",
    runs=lambda ctx: [{"ablation": ctx.ablation, "sample": ctx.sample}],
    plot=plot,
)
