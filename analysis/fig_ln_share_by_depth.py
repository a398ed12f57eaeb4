"""LayerNorm self-repair as a share of DE against relative depth."""

from __future__ import annotations

import polars as pl

from selfrepair.analysis.context import Context
from selfrepair.analysis.spec import FigureSpec, headline_params
from selfrepair.analysis.style import MODEL_COLOURS, attach, caption, keep_readable, new_figure


def plot(df: pl.DataFrame, ctx: Context):
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
    ax.set_ylabel("LayerNorm share of DE, mean(sr_ln) / mean(DE) (%)")
    ax.set_title(f"LayerNorm self-repair as a share of DE\n{ctx.facts()}")
    ax.legend(fontsize=7)
    capped = keep_readable(ax)
    caption(fig, "Ratio of means over each head's top p% tokens: mean(sr_ln) / mean(clean DE). Points: heads; "
                 "lines: layers. The per-token clipped share is in the query's ln_share_clipped column." + capped)
    return attach(fig, df)


FIGURE = FigureSpec(
    name="fig_ln_share_by_depth",
    title="LayerNorm share of DE against depth",
    query="ln_share",
    runs=lambda ctx: [headline_params(ctx)],
    plot=plot,
    per_model=False,
)
