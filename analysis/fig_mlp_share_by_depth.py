"""MLP self-repair as a share of DE against relative depth."""

from __future__ import annotations

import polars as pl

from selfrepair.analysis.context import Context
from selfrepair.analysis.spec import FigureSpec, headline_params
from selfrepair.analysis.style import MODEL_COLOURS, attach, caption, keep_readable, new_figure


def plot(df: pl.DataFrame, ctx: Context):
    """breakdown's mlps_share (and heads_share, dashed) per layer, one colour per model."""
    fig, axes = new_figure()
    ax = axes[0, 0]
    for i, info in enumerate(ctx.models):
        colour = MODEL_COLOURS[i % len(MODEL_COLOURS)]
        rows = df.filter(pl.col("model") == info.name)
        depth = rows["layer"] / info.n_layers
        ax.plot(depth, rows["mlps_share"] * 100, color=colour, lw=1.5, marker="o", ms=3, label=f"{info.name}: MLPs")
        ax.plot(depth, rows["heads_share"] * 100, color=colour, lw=1, ls=":", label=f"{info.name}: heads")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("relative depth (layer / n_layers)")
    ax.set_ylabel("share of DE, mean(sr_mlps) / mean(DE) (%)")
    ax.set_title(f"MLP self-repair as a share of DE\n{ctx.facts()}")
    ax.legend(fontsize=7)
    capped = keep_readable(ax)
    caption(fig, "Ratio of means over each layer's heads' top p% tokens: mean(sr_mlps) / mean(clean DE); "
                 "dotted: the same for downstream heads." + capped)
    return attach(fig, df)


FIGURE = FigureSpec(
    name="fig_mlp_share_by_depth",
    title="MLP share of DE against depth",
    query="breakdown",
    runs=lambda ctx: [headline_params(ctx)],
    plot=plot,
    per_model=False,
)
