"""Per-layer grouped bars: DE, ablated DE and the heads/MLPs/LayerNorm parts of self-repair."""

from __future__ import annotations

import numpy as np
import polars as pl

from selfrepair.analysis.context import Context
from selfrepair.analysis.errorbars import ci_err, ci_note
from selfrepair.analysis.spec import FigureSpec, headline_params
from selfrepair.analysis.style import LOGIT_UNIT, attach, caption, new_figure

BARS = (("de_clean", "clean DE"), ("de_ablated", "ablated DE"), ("sr_heads", "sr heads"),
        ("sr_mlps", "sr MLPs"), ("sr_ln", "sr LayerNorm"))


def plot(df: pl.DataFrame, ctx: Context):
    """Grouped bars of fig_layer_breakdown, one group per layer."""
    fig, axes = new_figure(figsize=(max(7.5, 0.35 * df.height + 3), 4.5))
    ax = axes[0, 0]
    x = np.arange(df.height)
    width = 0.8 / len(BARS)
    for i, (column, label) in enumerate(BARS):
        ax.bar(x + (i - (len(BARS) - 1) / 2) * width, df[column], width=width, label=label,
               yerr=ci_err(df, column), error_kw={"lw": 0.7, "capsize": 1.5, "ecolor": "black"})
    ax.set_xticks(x, [str(v) for v in df["layer"]])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("layer of the ablated head")
    ax.set_ylabel(f"mean over top p% tokens ({LOGIT_UNIT})")
    ax.set_title(f"DE, ablated DE and self-repair by component, per layer\n{ctx.facts()}")
    ax.legend(fontsize=7, ncols=5)
    caption(fig, "Means over each layer's heads' top p% tokens. sr = sr_heads + sr_mlps + sr_ln. "
                 f"{ci_note()}.")
    return attach(fig, df)


FIGURE = FigureSpec(
    name="fig_layer_breakdown",
    title="Per-layer breakdown",
    query="fig_layer_breakdown",
    runs=lambda ctx: [headline_params(ctx)],
    plot=plot,
)
