"""Per-head mean logit change against mean loss change and against KL: where the logit metric and the
whole output distribution disagree.

Drawn only for models whose store holds the output metrics (`Context`'s `output_metrics`).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from selfrepair.analysis.context import Context
from selfrepair.analysis.spec import FigureSpec
from selfrepair.analysis.style import LOGIT_UNIT, attach, caption, new_figure

OUTLIERS = 3  # heads labelled per panel: the farthest from the other heads' trend


def _outliers(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """The `k` points farthest (in robust z-units) from a least-squares line through all of them."""
    if len(x) < 3:
        return np.arange(len(x))
    slope, icept = np.polyfit(x, y, 1)
    r = y - (slope * x + icept)
    spread = np.median(np.abs(r - np.median(r))) or float(np.abs(r).max()) or 1.0
    return np.argsort(-np.abs(r) / spread, kind="stable")[:k]


def plot(df: pl.DataFrame, ctx: Context):
    """Two panels, one point per head coloured by layer: mean d_logit against mean d_loss, and against mean
    KL; the heads farthest from the trend are labelled."""
    fig, axes = new_figure(1, 2, figsize=(9.5, 4.4))
    x = df["d_logit"].to_numpy()
    labels = [f"L{la}H{h}" for la, h in zip(df["layer"], df["head"])]
    for ax, (col, name) in zip(axes[0], (("d_loss", "mean change in loss (nats)"),
                                         ("kl", "mean KL(clean ‖ ablated) (nats)"))):
        y = df[col].to_numpy()
        points = ax.scatter(x, y, c=df["layer"], cmap="viridis", s=14, vmin=0, vmax=max(ctx.model.n_layers - 1, 1))
        for i in _outliers(x, y, OUTLIERS):
            ax.annotate(labels[i], (x[i], y[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axvline(0, color="grey", lw=0.5)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel(f"mean change in the correct token's logit ({LOGIT_UNIT})")
        ax.set_ylabel(name)
    fig.colorbar(points, ax=axes[0, 1], label="layer")
    fig.suptitle(f"Logit change against loss change and KL per head, all tokens\n{ctx.facts()}", fontsize=9)
    caption(fig, "One point per head ablated alone, means over every stored token. The loss change is the "
                 "correct token's log-probability lost, the logit change plus the change in the log-partition; "
                 "KL(clean ‖ ablated) counts every token of the vocabulary. Heads far from the others' trend "
                 "(labelled) move the distribution more, or less, than their logit change says; top1_changed "
                 "(the fraction of flipped predictions) is in the figure's data.")
    return attach(fig, df)


FIGURE = FigureSpec(
    name="fig_dlogit_vs_output",
    title="Per-head logit change against loss change and KL",
    query="fig_dlogit_vs_output",
    runs=lambda ctx: [{"ablation": ctx.ablation, "sample": ctx.sample}],
    plot=plot,
    shown=lambda ctx: ctx.model.output_metrics,
)
