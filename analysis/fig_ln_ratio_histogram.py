"""Histogram of ln_ratio = s / s_abl on a head's top p% tokens, one series per ablation type."""

from __future__ import annotations

import polars as pl

from selfrepair.analysis.context import Context, head_label
from selfrepair.analysis.fig_ablation_types import ablations
from selfrepair.analysis.spec import FigureSpec
from selfrepair.analysis.style import attach, caption, new_figure

BIN_WIDTH = 0.01


def plot(df: pl.DataFrame, ctx: Context, paper: bool = False):
    """Step histograms of ln_ratio_distribution, the share above 1 in the legend."""
    fig, axes = new_figure()
    ax = axes[0, 0]
    kinds = ablations(ctx)
    for kind in kinds:
        bins = df.filter(pl.col("ablation") == kind)
        if bins.is_empty():
            continue
        share = bins["share_above_1"][0]
        ax.bar(bins["bin_lo"], bins["fraction"], width=bins["bin_hi"] - bins["bin_lo"], align="edge",
               alpha=0.45, label=f"{kind}: {share:.1%} of tokens above 1")
    ax.axvline(1.0, color="black", lw=1, ls="--")
    ax.set_xlabel("ln_ratio = s / s_abl (clean over ablated final-norm scale, unitless)")
    layer, head = ctx.focus_head
    tokens = "tokens above its 98th percentile of DE" if paper else f"top {ctx.p:.2%} tokens"
    ax.set_ylabel(f"fraction of the head's {tokens}")
    ax.set_title(f"Final-norm scale ratio on {head_label(layer, head)}'s {tokens}"
                 f"{' (authors’ token set)' if paper else ''}\n{ctx.facts(ablation='/'.join(kinds))}")
    ax.legend(fontsize=7)
    rule = ("Authors' token set: the head's tokens with clean DE strictly above its 98th percentile "
            "(numpy's linear interpolation). " if paper else "")
    caption(fig, rule + "Above 1 the final norm shrank once the head was ablated, amplifying what was left "
                 f"(LayerNorm self-repair). Bin width {BIN_WIDTH}.")
    return attach(fig, df)


FIGURE = FigureSpec(
    name="fig_ln_ratio_histogram",
    title="ln_ratio histogram",
    query="ln_ratio_distribution",
    runs=lambda ctx: [{"p": ctx.p, "ablation": kind, "sample": ctx.sample, "layer": ctx.focus_head[0],
                       "head": ctx.focus_head[1], "bin_width": BIN_WIDTH} for kind in ablations(ctx)],
    plot=plot,
    paper=FigureSpec(
        name="fig_ln_ratio_histogram_paper",
        title="ln_ratio histogram (authors' token set)",
        query="paper_ln_ratio_distribution",
        runs=lambda ctx: [{"ablation": kind, "sample": ctx.sample, "layer": ctx.focus_head[0],
                           "head": ctx.focus_head[1], "bin_width": BIN_WIDTH} for kind in ablations(ctx)],
        plot=lambda df, ctx: plot(df, ctx, paper=True),
    ),
)
