"""Backup map: which downstream heads and MLPs make up each ablated head's loss.

The PNG labels every row and column it draws: past MAX_ROWS ablated heads (or MAX_COLS components) it
draws those with the largest total |share| and says so. The report also shows the map as HTML
(`html_map`), every head and component, each cell's numbers on hover.
"""

from __future__ import annotations

import html as _html

import numpy as np
import polars as pl
from matplotlib.colors import Normalize

from selfrepair.analysis.context import Context, head_label
from selfrepair.analysis.page_format import number
from selfrepair.analysis.spec import FigureSpec
from selfrepair.analysis.style import attach, caption, new_figure

MAX_ROWS = 60  # ablated heads drawn in the PNG, each labelled (at 7 pt a row needs 0.14 in)
MAX_COLS = 60  # downstream components drawn, each labelled
ROW_INCHES = 0.14
LABEL_PT = 7


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


def strongest(grid: np.ndarray, axis: int, limit: int) -> np.ndarray:
    """Indices (in depth order) of the `limit` rows (axis 1) or columns (axis 0) with the largest total
    |share|, ties to the shallower; all of them when there are at most `limit`."""
    total = np.nansum(np.abs(grid), axis=axis)
    if total.size <= limit:
        return np.arange(total.size)
    order = np.argsort(-total, kind="stable")[:limit]
    return np.sort(order)


def _bound(grid: np.ndarray) -> float:
    finite = np.abs(grid[np.isfinite(grid)])
    bound = float(np.quantile(finite, 0.99)) if finite.size else 1.0
    return bound or 1.0


def plot(df: pl.DataFrame, ctx: Context):
    """fig_backup_map as a heatmap of share, diverging around 0, every drawn row and column labelled."""
    full, row_labels, col_labels = matrix(df)
    rows, cols = strongest(full, 1, MAX_ROWS), strongest(full, 0, MAX_COLS)
    grid = full[np.ix_(rows, cols)]
    height = max(4.5, 2.2 + ROW_INCHES * len(rows))
    width = max(6.0, 3.0 + ROW_INCHES * len(cols))
    fig, axes = new_figure(figsize=(width, height))
    ax = axes[0, 0]
    ax.grid(False)
    bound = _bound(full)
    image = ax.imshow(grid, cmap="RdBu_r", norm=Normalize(-bound, bound), aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="share of the ablated head's DE, mean(ΔDE) / mean(DE) (ratio)")
    ax.set_yticks(range(len(rows)), [row_labels[i] for i in rows], fontsize=LABEL_PT)
    ax.set_xticks(range(len(cols)), [col_labels[j] for j in cols], fontsize=LABEL_PT, rotation=90)
    ax.set_xlabel("downstream component (head or MLP)")
    ax.set_ylabel("ablated head")
    ax.set_title(f"Backup map: downstream repair of each ablated head\n{ctx.facts()}")
    shown = ""
    if len(rows) < len(row_labels) or len(cols) < len(col_labels):
        shown = (f" Drawn: the {len(rows)} of {len(row_labels)} ablated heads and {len(cols)} of {len(col_labels)} "
                 "components with the largest total |share|, in depth order; the HTML map shows all.")
    caption(fig, "Red: the component's DE rose and made up part of the loss (a backup); blue: it fell. Means over "
                 "the ablated head's top p% tokens (the ingest's top_p, repair_sources), colour clipped at the 99th "
                 "percentile of |share|." + shown)
    return attach(fig, df)


def _cell_colour(value: float, bound: float) -> str:
    if not np.isfinite(value):
        return "#f4f4f4"
    a = min(1.0, abs(value) / bound)
    rgb = (178, 24, 43) if value > 0 else (33, 102, 172)  # the ends of RdBu_r, as the PNG
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{a:.2f})"


def html_map(df: pl.DataFrame, ctx: Context) -> str:
    """The backup map as an HTML table: every ablated head and component labelled, each cell's ablated
    head, component, share, mean ΔDE and token count on hover (a tooltip and the line under the map)."""
    e = _html.escape
    grid, row_labels, col_labels = matrix(df)
    detail = {(r["layer"], r["head"], r["component"]): r for r in df.iter_rows(named=True)}
    rows_lc = df.select("layer", "head").unique().sort("layer", "head").rows()
    bound = _bound(grid)
    head = "".join(f'<th class="col"><span>{e(c)}</span></th>' for c in col_labels)
    body = []
    for i, (layer, h) in enumerate(rows_lc):
        cells = []
        for j, comp in enumerate(col_labels):
            r = detail.get((layer, h, comp))
            tip = (f"{row_labels[i]} ablated → {comp}: share {number(r['share'])}, mean ΔDE {number(r['d_de'])}, "
                   f"{r['n_tokens']} tokens" if r else f"{row_labels[i]} ablated → {comp}: no row")
            cells.append(f'<td style="background:{_cell_colour(grid[i, j], bound)}" title="{e(tip)}" '
                         f'data-tip="{e(tip)}"></td>')
        body.append(f'<tr><th class="row">{e(row_labels[i])}</th>{"".join(cells)}</tr>')
    return (f'<div class="backup-map" data-rows="{len(row_labels)}" data-cols="{len(col_labels)}">'
            "<style>.backup-map table { border-collapse: collapse; font: 10px monospace; }"
            ".backup-map td { width: 16px; height: 16px; border: 1px solid #fff; }"
            ".backup-map td:hover { outline: 2px solid #000; }"
            ".backup-map th.col { height: 5em; vertical-align: bottom; }"
            ".backup-map th.col span { writing-mode: vertical-rl; transform: rotate(180deg); }"
            ".backup-map th.row { text-align: right; padding-right: 4px; }</style>"
            f"<p>Hover a cell (colour: share, red a backup, blue the opposite, clipped at ±{e(number(bound))}). "
            f'<span class="backup-tip"></span></p><div style="overflow:auto"><table><tr><th></th>{head}</tr>'
            f'{"".join(body)}</table></div>'
            "<script>document.currentScript.parentNode.addEventListener('mouseover', function (ev) {"
            " var tip = ev.target.getAttribute && ev.target.getAttribute('data-tip');"
            " if (tip) { ev.currentTarget.querySelector('.backup-tip').textContent = tip; } });</script></div>")


FIGURE = FigureSpec(
    name="fig_backup_map",
    title="Backup-head map",
    query="fig_backup_map",
    runs=lambda ctx: [{"ablation": ctx.ablation, "sample": ctx.sample}],
    plot=plot,
    html=html_map,
)
