"""The backup map (issue 23): a label for every row and column the PNG draws, and an HTML map of every
ablated head and component whose cells give their numbers on hover. A synthetic frame: no store."""

from __future__ import annotations

import re

import numpy as np
import polars as pl

from selfrepair.analysis import fig_backup_map as fig
from selfrepair.analysis.context import Context, ModelInfo
from selfrepair.analysis.page_format import number
from selfrepair.analysis.style import rc

CTX = Context(models=(ModelInfo("m", 12, 6, 1000, 0.02, ("resample",), 1),), ablation="resample", p=0.02)


def _frame(n_layers: int, n_heads: int) -> pl.DataFrame:
    """Every head of every layer but the last, repaired by each later head and MLP."""
    rng = np.random.default_rng(0)
    rows = []
    for layer in range(n_layers - 1):
        for head in range(n_heads):
            for src in range(layer + 1, n_layers):
                for kind, src_head in [("head", h) for h in range(n_heads)] + [("mlp", -1)]:
                    comp = f"MLP{src}" if kind == "mlp" else f"L{src}H{src_head}"
                    rows.append((layer, head, kind, src, src_head, comp, 6, float(rng.normal()), float(rng.normal())))
    return pl.DataFrame(rows, schema=["layer", "head", "src_kind", "src_layer", "src_head", "component", "n_tokens",
                                      "d_de", "share"], orient="row")


def test_every_drawn_row_and_column_is_labelled():
    df = _frame(12, 6)  # 66 ablated heads, 77 components: more than the PNG draws
    grid, rows, cols = fig.matrix(df)
    with rc():
        figure = fig.plot(df, CTX)
    ax = figure.axes[0]
    ylabels = [t.get_text() for t in ax.get_yticklabels()]
    xlabels = [t.get_text() for t in ax.get_xticklabels()]
    assert len(ylabels) == fig.MAX_ROWS == ax.get_images()[0].get_array().shape[0] and all(ylabels)
    assert len(xlabels) == fig.MAX_COLS == ax.get_images()[0].get_array().shape[1] and all(xlabels)
    # The rows drawn are those with the largest total |share|, in depth order.
    total = np.nansum(np.abs(grid), axis=1)
    strongest = {rows[i] for i in np.argsort(-total, kind="stable")[:fig.MAX_ROWS]}
    assert set(ylabels) == strongest and ylabels == [r for r in rows if r in strongest]
    assert "the 60 of 66 ablated heads and 60 of 77 components" in figure.selfrepair_caption
    small = _frame(3, 2)
    with rc():
        ax = fig.plot(small, CTX).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["L0H0", "L0H1", "L1H0", "L1H1"]


def test_the_html_map_shows_every_cell_with_its_numbers_on_hover():
    df = _frame(12, 6)
    page = fig.html_map(df, CTX)
    assert 'data-rows="66" data-cols="77"' in page
    assert len(re.findall(r'<th class="row">', page)) == 66 and len(re.findall(r'<th class="col">', page)) == 77
    tips = re.findall(r'<td style="[^"]*" title="([^"]*)"', page)
    assert len(tips) == 66 * 77
    r = df.row(0, named=True)
    assert (f"L{r['layer']}H{r['head']} ablated → {r['component']}: share {number(r['share'])}, mean ΔDE "
            f"{number(r['d_de'])}, 6 tokens") in tips
    assert sum(t.endswith("no row") for t in tips) == 66 * 77 - df.height
