"""How much of each penultimate-layer head's self-repair the final MLP explains (else the latest layer's)."""

from __future__ import annotations

import polars as pl

from selfrepair.analysis import penultimate
from selfrepair.analysis.context import Context
from selfrepair.analysis.spec import FigureSpec
from selfrepair.analysis.style import attach, caption


def plot(df: pl.DataFrame, ctx: Context):
    """fig_final_mlp_share: self-repair and the final MLP's part, per head, the share above."""
    fig = penultimate.paired_bars(
        df, (("sr", "self-repair"), ("final_mlp", "final MLP's ΔDE")), "final_mlp_share",
        "mean(final MLP) / mean(sr)",
        f"Self-repair of {penultimate.layer_text(ctx)} heads explained by the final MLP\n{ctx.facts()}")
    caption(fig, "Ratio of means over each head's top p% tokens (the ingest's top_p, from repair_sources).")
    return attach(fig, df)


def plot_paper(df: pl.DataFrame, ctx: Context):
    """paper_final_mlp_share: self-repair and every MLP's part, per head, the clipped share above."""
    fig = penultimate.paired_bars(
        df, (("sr", "self-repair"), ("sr_mlps", "ΔDE of every MLP layer")), "mlps_share",
        "mean of clip(max(sr_mlps, 0) / sr, 0, 1)",
        f"Self-repair of {penultimate.layer_text(ctx)} heads explained by the MLPs (authors' statistic)\n{ctx.facts()}")
    caption(fig, "Authors' statistic: over each head's top p% tokens with sr > 0, the mean of "
                 "clip(max(sr_mlps, 0) / sr, 0, 1), sr_mlps summing every MLP layer (for a penultimate-layer "
                 "head, the last two).")
    return attach(fig, df)


FIGURE = FigureSpec(
    name="fig_final_mlp_share",
    title="Final MLP share of self-repair",
    query="fig_final_mlp_share",
    runs=lambda ctx: penultimate.runs(ctx, ablation=ctx.ablation, sample=ctx.sample),
    plot=plot,
    skip=penultimate.skip,
    paper=FigureSpec(
        name="fig_final_mlp_share_paper",
        title="MLP share of self-repair (authors' statistic)",
        query="paper_final_mlp_share",
        runs=lambda ctx: penultimate.runs(ctx, p=ctx.p, ablation=ctx.ablation, sample=ctx.sample),
        plot=plot_paper,
        skip=penultimate.skip,
    ),
)
