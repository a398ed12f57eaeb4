"""How much of the final MLP's repair its top 5 neurons explain, per penultimate-layer head."""

from __future__ import annotations

import polars as pl

from selfrepair.analysis import penultimate
from selfrepair.analysis.context import Context
from selfrepair.analysis.neurons import KEPT_NOTE
from selfrepair.analysis.spec import FigureSpec
from selfrepair.analysis.style import attach, caption

TOP_N = 5


def plot(df: pl.DataFrame, ctx: Context):
    """fig_top_neurons_share: the final MLP's repair and its top neurons' part, per head."""
    fig = penultimate.paired_bars(
        df, (("final_mlp", "final MLP's ΔDE"), ("top_neurons", f"top {TOP_N} neurons")), "top_share",
        "mean(top neurons) / mean(final MLP)",
        f"Final-MLP repair explained by its top {TOP_N} neurons, {penultimate.layer_text(ctx)} heads\n{ctx.facts()}")
    caption(fig, f"Ratio of means over each head's top p% tokens; a token's top {TOP_N} neurons are ranked by "
                 f"their repair on that token. {KEPT_NOTE}")
    return attach(fig, df)


def plot_paper(df: pl.DataFrame, ctx: Context):
    """paper_top_neurons_share: every MLP's repair and the top neurons' part, per head, the capped share above."""
    fig = penultimate.paired_bars(
        df, (("sr_mlps", "ΔDE of every MLP layer"), ("top_neurons", f"top {TOP_N} final-MLP neurons")),
        "top_share", "mean of min(top neurons / sr_mlps, 300%)",
        f"MLP repair explained by the top {TOP_N} final-MLP neurons (authors' statistic), {penultimate.layer_text(ctx)} "
        f"heads\n{ctx.facts()}")
    caption(fig, f"Authors' statistic and token set: each head's top p% tokens by sr_mlps (not by DE); per token, "
                 f"the sum of the {TOP_N} largest signed neuron repairs over sr_mlps, capped at 300% (no lower "
                 "clip), averaged. Needs the ingest's --sr-mlps-neurons for these heads.")
    return attach(fig, df)


FIGURE = FigureSpec(
    name="fig_top_neurons_share",
    title="Top-neuron share of MLP repair",
    query="fig_top_neurons_share",
    runs=lambda ctx: penultimate.runs(ctx, ablation=ctx.ablation, sample=ctx.sample, top_n=TOP_N),
    plot=plot,
    skip=penultimate.skip,
    paper=FigureSpec(
        name="fig_top_neurons_share_paper",
        title="Top-neuron share of MLP repair (authors' statistic)",
        query="paper_top_neurons_share",
        runs=lambda ctx: penultimate.runs(ctx, ablation=ctx.ablation, sample=ctx.sample, top_n=TOP_N),
        plot=plot_paper,
        skip=penultimate.skip,
    ),
)
