"""The draw-spread figure (issue 22): a legend naming every draw, colours that read on white, the mean over
draws with its interval; drawn from a frame in the query's shape (the tiny stores hold one draw)."""

from __future__ import annotations

import numpy as np
import polars as pl
from matplotlib.collections import PathCollection
from matplotlib.colors import to_rgb

from selfrepair.analysis import fig_resample_spread
from selfrepair.analysis.context import Context, ModelInfo
from selfrepair.analysis.style import rc


def _frame(n_draws: int) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    rows = [(l, h, s) for l in range(2) for h in range(3) for s in range(n_draws)]
    sr = rng.normal(0, 0.1, len(rows))
    df = pl.DataFrame({"model": ["m"] * len(rows), "layer": [r[0] for r in rows], "head": [r[1] for r in rows],
                       "sample": [r[2] for r in rows], "n_tokens": [10] * len(rows), "de_clean": [0.5] * len(rows),
                       "sr": sr, "n_dropped": [0] * len(rows)})
    pooled = df.group_by("layer", "head").agg(pl.col("sr").mean().alias("sr_draws"))
    df = df.join(pooled, on=["layer", "head"])
    return df.with_columns((pl.col("sr_draws") - 0.05).alias("sr_ci_low"), (pl.col("sr_draws") + 0.05).alias("sr_ci_high"))


def _luminance(colour) -> float:
    """Relative luminance (WCAG): white is 1; yellow is above 0.8, the colours kept are below 0.6."""
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in to_rgb(colour)]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def test_draw_spread_has_a_legend_and_colours_that_read_on_white():
    n = 9  # more draws than colours: they cycle with another marker
    ctx = Context(models=(ModelInfo("m", 2, 3, 100, 0.1, ("resample",), n),), ablation="resample", p=0.1)
    with rc():
        fig = fig_resample_spread.plot(_frame(n), ctx)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert [f"draw {s}" for s in range(n)] == [t for t in labels if t.startswith("draw ")]
    assert "mean over draws, CI over rows and draws" in labels and "range of the draws" in labels
    points = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(points) == n
    for c in points:
        assert _luminance(c.get_facecolor()[0][:3]) < 0.6
    keys = {(tuple(c.get_facecolor()[0]), c.get_paths()[0].vertices.tobytes()) for c in points}
    assert len(keys) == n  # every draw drawn distinctly (colour and marker)
