"""How often each final-MLP neuron is among a token's top 10 repairers."""

from __future__ import annotations

import numpy as np
import polars as pl

from selfrepair.analysis.context import Context
from selfrepair.analysis.neurons import KEPT_NOTE, PAPER_NOTE, head_params, head_title, paper_params, paper_skip, paper_title
from selfrepair.analysis.spec import FigureSpec
from selfrepair.analysis.style import attach, caption, new_figure

TOP_N = 10
LIMIT = 30


def plot(df: pl.DataFrame, ctx: Context, paper: bool = False):
    """fig_neuron_top_frequency: one bar per neuron, most frequent first."""
    fig, axes = new_figure()
    ax = axes[0, 0]
    x = np.arange(df.height)
    ax.bar(x, df["frequency"] * 100, color="tab:blue")
    ax.set_xticks(x, [str(n) for n in df["neuron"]], rotation=90)
    ax.set_xlabel("final-MLP neuron")
    ax.set_ylabel(f"tokens with the neuron in the top {TOP_N} (%)")
    what = f"How often each neuron is a top-{TOP_N} repairer"
    ax.set_title(paper_title(ctx, what) if paper else head_title(ctx, what))
    caption(fig, f"Share of the head's tokens on which the neuron is among the {TOP_N} largest repairs; "
                 f"the {LIMIT} most frequent neurons. {PAPER_NOTE if paper else KEPT_NOTE}")
    return attach(fig, df)


FIGURE = FigureSpec(
    name="fig_neuron_top_frequency",
    title="Top-10 neuron frequency",
    query="fig_neuron_top_frequency",
    runs=lambda ctx: [head_params(ctx) | {"top_n": TOP_N, "limit": LIMIT}],
    plot=plot,
    paper=FigureSpec(
        name="fig_neuron_top_frequency_paper",
        title="Top-10 neuron frequency (authors' token set)",
        query="paper_neuron_top_frequency",
        runs=lambda ctx: [paper_params(ctx) | {"top_n": TOP_N, "limit": LIMIT}],
        plot=lambda df, ctx: plot(df, ctx, paper=True),
        skip=paper_skip,
    ),
)
