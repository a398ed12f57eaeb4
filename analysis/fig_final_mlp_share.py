"""How much of each penultimate-layer head's self-repair the final MLP explains."""

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
        f"Self-repair of penultimate-layer heads explained by the final MLP\n{ctx.facts()}")
    caption(fig, "Ratio of means over each head's top p% tokens (the ingest's top_p, from repair_sources).")
    return attach(fig, df)


FIGURE = FigureSpec(
    name="fig_final_mlp_share",
    title="Final MLP share of self-repair",
    query="fig_final_mlp_share",
    runs=lambda ctx: [{"layer": -1, "ablation": ctx.ablation, "sample": ctx.sample}],
    plot=plot,
    skip=penultimate.skip,
)
