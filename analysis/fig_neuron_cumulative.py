"""Cumulative share of absolute neuron repair against rank, coloured by median clean DE."""

from __future__ import annotations

import numpy as np
import polars as pl
from matplotlib.colors import Normalize

from selfrepair.analysis.context import Context
from selfrepair.analysis.neurons import KEPT_NOTE, head_params, head_title
from selfrepair.analysis.spec import FigureSpec
from selfrepair.analysis.style import LOGIT_UNIT, attach, caption, new_figure


def plot(df: pl.DataFrame, ctx: Context):
    """fig_neuron_cumulative: running share against rank, points coloured by median clean DE."""
    fig, axes = new_figure()
    ax = axes[0, 0]
    ax.plot(df["rank"], df["cumulative_share"] * 100, color="grey", lw=0.8)
    bound = float(np.nanmax(np.abs(df["median_de_clean"].to_numpy()))) if df.height else 1.0
    points = ax.scatter(df["rank"], df["cumulative_share"] * 100, c=df["median_de_clean"], cmap="RdBu_r",
                        norm=Normalize(-(bound or 1.0), bound or 1.0), s=14, zorder=3)
    fig.colorbar(points, ax=ax, label=f"neuron's median clean DE ({LOGIT_UNIT})")
    if df["cumulative_share"].is_not_null().any():
        ax.set_xscale("log")
    else:  # every kept neuron's repair is 0 (e.g. the final MLP is not downstream of the head)
        ax.text(0.5, 0.5, "no neuron repair: every kept neuron's ΔDE is 0", transform=ax.transAxes, ha="center")
    ax.set_xlabel("neuron rank by total |repair|")
    ax.set_ylabel("cumulative share of total |repair| (%)")
    ax.set_title(head_title(ctx, "Cumulative neuron repair"))
    caption(fig, "Blue points at top ranks (negative clean DE) are anti-erasure: neurons that erased the correct "
                 f"token and erase less once the head is ablated. {KEPT_NOTE}")
    return attach(fig, df)


FIGURE = FigureSpec(
    name="fig_neuron_cumulative",
    title="Cumulative neuron repair",
    query="fig_neuron_cumulative",
    runs=lambda ctx: [head_params(ctx)],
    plot=plot,
)
