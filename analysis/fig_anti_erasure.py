"""Anti-erasure: the top repairing neuron's clean DE against its ablated DE, per token."""

from __future__ import annotations

import numpy as np
import polars as pl

from selfrepair.analysis.context import Context
from selfrepair.analysis.neurons import KEPT_NOTE, PAPER_NOTE, head_params, head_title, paper_params, paper_skip, paper_title
from selfrepair.analysis.spec import FigureSpec
from selfrepair.analysis.style import LOGIT_UNIT, attach, caption, new_figure


def plot(df: pl.DataFrame, ctx: Context, paper: bool = False):
    """fig_anti_erasure_top_neuron (or the authors' paper_anti_erasure_top_neuron): one point per token, y = x line."""
    fig, axes = new_figure()
    ax = axes[0, 0]
    if paper:  # as the authors coloured it: the final MLP's clean DE on the token
        points = ax.scatter(df["de_clean"], df["de_ablated"], c=df["final_mlp_de"], cmap="RdBu", s=14)
        fig.colorbar(points, ax=ax, label=f"final MLP's clean DE ({LOGIT_UNIT})")
    else:
        points = ax.scatter(df["de_clean"], df["de_ablated"], c=df["repair"], cmap="viridis", s=14)
        fig.colorbar(points, ax=ax, label=f"repair = ablated − clean DE ({LOGIT_UNIT})")
    values = np.concatenate([df["de_clean"].to_numpy(), df["de_ablated"].to_numpy(), [0.0]])
    lim = float(np.nanmax(np.abs(values))) * 1.1 or 1.0
    ax.plot([-lim, lim], [-lim, lim], color="black", lw=0.8, ls="--", label="y = x: no change")
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    anti = df.filter(pl.col("de_clean") < 0).height
    ax.text(0.03, 0.97, f"anti-erasure: clean DE < 0, rises toward 0\n({anti} of {df.height} tokens)",
            transform=ax.transAxes, ha="left", va="top")
    ax.set_xlabel(f"top neuron's clean DE ({LOGIT_UNIT})")
    ax.set_ylabel(f"top neuron's ablated DE ({LOGIT_UNIT})")
    what = "Anti-erasure of the top repairing neuron"
    ax.set_title(paper_title(ctx, what) if paper else head_title(ctx, what))
    ax.legend(loc="lower right", fontsize=7)
    caption(fig, f"One point per token: the final-MLP neuron with the largest repair. "
                 f"{PAPER_NOTE if paper else KEPT_NOTE}")
    return attach(fig, df)


FIGURE = FigureSpec(
    name="fig_anti_erasure",
    title="Anti-erasure scatter",
    query="fig_anti_erasure_top_neuron",
    runs=lambda ctx: [{k: v for k, v in head_params(ctx).items() if k != "p"}],  # its query reads every stored token
    plot=plot,
    paper=FigureSpec(
        name="fig_anti_erasure_paper",
        title="Anti-erasure scatter (authors' token set)",
        query="paper_anti_erasure_top_neuron",
        runs=lambda ctx: [paper_params(ctx)],
        plot=lambda df, ctx: plot(df, ctx, paper=True),
        skip=paper_skip,
    ),
)
