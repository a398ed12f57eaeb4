"""Per-token DE against logit change for four heads: how noisy self-repair is token by token."""

from __future__ import annotations

import numpy as np
import polars as pl

from selfrepair.analysis.context import Context, head_label
from selfrepair.analysis.spec import FigureSpec
from selfrepair.analysis.style import LOGIT_UNIT, attach, caption, new_figure


def scatter_tokens(ax, tokens: pl.DataFrame, title: str) -> None:
    """Every token of one head (head_tokens rows), top p% tokens highlighted, y = −x line."""
    rest, top = tokens.filter(~pl.col("is_top")), tokens.filter(pl.col("is_top"))
    ax.scatter(rest["de_clean"], rest["d_logit"], s=5, alpha=0.35, color="tab:grey", label="other tokens")
    ax.scatter(top["de_clean"], top["d_logit"], s=9, alpha=0.8, color="tab:orange", label="top p% tokens")
    values = np.concatenate([tokens["de_clean"].to_numpy(), tokens["d_logit"].to_numpy(), [0.0]])
    lim = float(np.nanmax(np.abs(values))) * 1.05 or 1.0
    ax.plot([-lim, lim], [lim, -lim], color="black", lw=0.8, ls="--", label="y = −x")
    ax.set_title(title)


def plot(df: pl.DataFrame, ctx: Context):
    """2 × 2 panels of head_tokens, one per head of `ctx.heads`."""
    n = len(ctx.heads)
    ncols = 2 if n > 1 else 1
    nrows = (n + ncols - 1) // ncols
    fig, axes = new_figure(nrows, ncols, figsize=(8, 3.4 * nrows))
    for i, (layer, head) in enumerate(ctx.heads):
        ax = axes[i // ncols, i % ncols]
        tokens = df.filter((pl.col("layer") == layer) & (pl.col("head") == head))
        scatter_tokens(ax, tokens, head_label(layer, head))
        ax.set_xlabel(f"clean DE ({LOGIT_UNIT})")
        ax.set_ylabel(f"Δlogit ({LOGIT_UNIT})")
    for j in range(n, nrows * ncols):
        axes[j // ncols, j % ncols].axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"Per-token DE against logit change\n{ctx.facts()}", fontsize=9)
    caption(fig, "One point per token. Orange: the head's top p% tokens by signed clean DE. "
                 "Tokens far from the dashed line were repaired (above) or broken (below).")
    return attach(fig, df)


FIGURE = FigureSpec(
    name="fig_token_noise",
    title="Per-token noise of four heads",
    query="head_tokens",
    runs=lambda ctx: [{"layer": l, "head": h, "p": ctx.p, "ablation": ctx.ablation, "sample": ctx.sample}
                      for l, h in ctx.heads],
    plot=plot,
)
