"""How sparse final-MLP repair is: the N-th largest neuron's repair against thresholds of DE."""

from __future__ import annotations

import polars as pl

from selfrepair.analysis.context import Context
from selfrepair.analysis.neurons import KEPT_NOTE, head_params, head_title
from selfrepair.analysis.spec import FigureSpec
from selfrepair.analysis.style import attach, caption, new_figure

MAX_RANK = 50


def plot(df: pl.DataFrame, ctx: Context):
    """fig_neuron_sparsity: one line per threshold X, share of tokens against N."""
    fig, axes = new_figure()
    ax = axes[0, 0]
    for threshold in sorted(df["threshold_pct"].unique().to_list(), reverse=True):
        rows = df.filter(pl.col("threshold_pct") == threshold)
        ax.plot(rows["n_rank"], rows["share"] * 100, marker="o", ms=2, label=f"X = {threshold:g}%")
    ax.set_xlabel("N (rank of the neuron's repair on the token)")
    ax.set_ylabel("tokens where the N-th neuron repairs > X% of the head's DE (%)")
    ax.set_title(head_title(ctx, "Neuron sparsity"))
    ax.legend(fontsize=7)
    caption(fig, "Per-token counts: the share of the head's top p% tokens on which the N-th largest "
                 f"final-MLP neuron repair exceeds X% of the head's clean DE on that token. {KEPT_NOTE}")
    return attach(fig, df)


FIGURE = FigureSpec(
    name="fig_neuron_sparsity",
    title="Neuron sparsity",
    query="fig_neuron_sparsity",
    runs=lambda ctx: [head_params(ctx) | {"max_rank": MAX_RANK}],
    plot=plot,
)
