"""LayerNorm self-repair as a share of DE against relative depth."""

from __future__ import annotations

import polars as pl

from selfrepair.analysis.context import Context
from selfrepair.analysis.spec import FigureSpec, headline_params
from selfrepair.analysis.style import MODEL_COLOURS, attach, caption, keep_readable, new_figure


RATIO = ("mean(sr_ln) / mean(DE)", "Ratio of means over each head's top p% tokens: mean(sr_ln) / mean(clean DE). "
         "The per-token clipped share is in the query's ln_share_clipped column.")
CLIPPED = ("mean of clip(sr_ln / DE, 0, 1)", "Authors' statistic: the mean over each head's top p% tokens of "
           "clip(sr_ln / DE, 0, 1) (DE = 0 counts as 0 or 1 by the sign of sr_ln, 0/0 left out).")


def plot(df: pl.DataFrame, ctx: Context, statistic: tuple[str, str] = RATIO):
    """ln_share rows: per-head points and the per-layer line (head NULL rows), one colour per model."""
    fig, axes = new_figure()
    ax = axes[0, 0]
    for i, info in enumerate(ctx.models):
        colour = MODEL_COLOURS[i % len(MODEL_COLOURS)]
        rows = df.filter(pl.col("model") == info.name)
        heads, layers = rows.filter(pl.col("head").is_not_null()), rows.filter(pl.col("head").is_null())
        ax.scatter(heads["layer"] / info.n_layers, heads["ln_share"] * 100, s=8, alpha=0.35, color=colour)
        ax.plot(layers["layer"] / info.n_layers, layers["ln_share"] * 100, color=colour, lw=1.5,
                marker="o", ms=3, label=f"{info.name} (layer)")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("relative depth (layer / n_layers)")
    ax.set_ylabel(f"LayerNorm share of DE, {statistic[0]} (%)")
    ax.set_title(f"LayerNorm self-repair as a share of DE\n{ctx.facts()}")
    ax.legend(fontsize=7)
    capped = keep_readable(ax)
    caption(fig, f"{statistic[1]} Points: heads; lines: layers." + capped)
    return attach(fig, df)


FIGURE = FigureSpec(
    name="fig_ln_share_by_depth",
    title="LayerNorm share of DE against depth",
    query="ln_share",
    runs=lambda ctx: [headline_params(ctx)],
    plot=plot,
    per_model=False,
    paper=FigureSpec(
        name="fig_ln_share_by_depth_paper",
        title="LayerNorm share of DE against depth (authors' statistic)",
        query="paper_shares",
        runs=lambda ctx: [headline_params(ctx)],
        plot=lambda df, ctx: plot(df, ctx, CLIPPED),
        per_model=False,
    ),
)
