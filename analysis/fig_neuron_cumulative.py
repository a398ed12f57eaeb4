"""Cumulative share of final-MLP repair against neuron rank by signed change in DE (the authors' curve)."""

from __future__ import annotations

import polars as pl

from selfrepair.analysis.context import Context
from selfrepair.analysis.neurons import KEPT_NOTE, head_params, head_title
from selfrepair.analysis.spec import FigureSpec
from selfrepair.analysis.style import attach, caption, new_figure

MAX_RANK = 50


def plot(df: pl.DataFrame, ctx: Context):
    """fig_neuron_cumulative: the mean per-token running share against N."""
    fig, axes = new_figure()
    ax = axes[0, 0]
    ax.plot(df["n_rank"], df["cumulative_share"] * 100, marker="o", ms=2)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("N (neurons by signed repair on the token, largest first)")
    ax.set_ylabel("summed repair of the top N over summed |repair| of all neurons (%)")
    ax.set_title(head_title(ctx, "Cumulative neuron repair"))
    caption(fig, "Per token: the top N neurons' summed ΔDE over the sum of |ΔDE| over every final-MLP neuron "
                 f"(neuron_totals), averaged over the head's top p% tokens, as Rushing & Nanda did. {KEPT_NOTE}")
    return attach(fig, df)


FIGURE = FigureSpec(
    name="fig_neuron_cumulative",
    title="Cumulative neuron repair",
    query="fig_neuron_cumulative",
    runs=lambda ctx: [head_params(ctx) | {"max_rank": MAX_RANK}],
    plot=plot,
)
