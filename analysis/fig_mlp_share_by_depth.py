"""MLP self-repair as a share of DE against relative depth."""

from __future__ import annotations

import polars as pl

from selfrepair.analysis.context import Context
from selfrepair.analysis.spec import FigureSpec, headline_params
from selfrepair.analysis.style import MODEL_COLOURS, attach, caption, keep_readable, new_figure


RATIO = ("mean(sr_mlps) / mean(DE)", "Ratio of means over each layer's heads' top p% tokens: "
         "mean(sr_mlps) / mean(clean DE); dotted: the same for downstream heads.")
CLIPPED = ("mean of clip(sr_mlps / DE, 0, 1)", "Authors' statistic: per head, the mean over its top p% tokens of "
           "clip(x / DE, 0, 1) (DE = 0 counts as 0 or 1 by the sign of x, 0/0 left out), averaged over the "
           "layer's heads; x = sr_mlps (every MLP layer), dotted: x = sr_heads.")


def plot(df: pl.DataFrame, ctx: Context, statistic: tuple[str, str] = RATIO):
    """breakdown's mlps_share (and heads_share, dashed) per layer, one colour per model."""
    fig, axes = new_figure()
    ax = axes[0, 0]
    if "head" in df.columns:  # paper_shares: keep its per-layer rows
        df = df.filter(pl.col("head").is_null())
    for i, info in enumerate(ctx.models):
        colour = MODEL_COLOURS[i % len(MODEL_COLOURS)]
        rows = df.filter(pl.col("model") == info.name)
        depth = rows["layer"] / info.n_layers
        ax.plot(depth, rows["mlps_share"] * 100, color=colour, lw=1.5, marker="o", ms=3, label=f"{info.name}: MLPs")
        ax.plot(depth, rows["heads_share"] * 100, color=colour, lw=1, ls=":", label=f"{info.name}: heads")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("relative depth (layer / n_layers)")
    ax.set_ylabel(f"share of DE, {statistic[0]} (%)")
    ax.set_title(f"MLP self-repair as a share of DE\n{ctx.facts()}")
    ax.legend(fontsize=7)
    capped = keep_readable(ax)
    caption(fig, statistic[1] + capped)
    return attach(fig, df)


FIGURE = FigureSpec(
    name="fig_mlp_share_by_depth",
    title="MLP share of DE against depth",
    query="breakdown",
    runs=lambda ctx: [headline_params(ctx)],
    plot=plot,
    per_model=False,
    paper=FigureSpec(
        name="fig_mlp_share_by_depth_paper",
        title="MLP share of DE against depth (authors' statistic)",
        query="paper_shares",
        runs=lambda ctx: [headline_params(ctx)],
        plot=lambda df, ctx: plot(df, ctx, CLIPPED),
        per_model=False,
    ),
)
