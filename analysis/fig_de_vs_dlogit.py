"""Per-head mean DE against mean logit change over all tokens, with the y = −x line."""

from __future__ import annotations

import numpy as np
import polars as pl

from selfrepair.analysis.errorbars import ci_err, ci_note
from selfrepair.analysis.context import Context
from selfrepair.analysis.spec import FigureSpec
from selfrepair.analysis.style import LOGIT_UNIT, attach, caption, new_figure


ALL_TOKENS = "means over all tokens"
PAPER_MEANS = ("authors' statistic: the mean over batches of each batch's mean over tokens with |DE| > 0")


def plot(df: pl.DataFrame, ctx: Context, means: str = ALL_TOKENS):
    """Scatter of fig_head_de_vs_dlogit, coloured by layer, with the regions labelled."""
    fig, axes = new_figure()
    ax = axes[0, 0]
    points = ax.scatter(df["de_clean"], df["d_logit"], c=df["layer"], cmap="viridis", s=14,
                        vmin=0, vmax=max(ctx.model.n_layers - 1, 1))
    fig.colorbar(points, ax=ax, label="layer")
    xerr, yerr = ci_err(df, "de_clean"), ci_err(df, "d_logit")
    if yerr is not None:
        ax.errorbar(df["de_clean"], df["d_logit"], xerr=xerr, yerr=yerr, fmt="none", ecolor="grey", lw=0.6,
                    zorder=1)
    values = np.concatenate([df["de_clean"].to_numpy(), df["d_logit"].to_numpy(), [0.0]])
    lim = float(np.nanmax(np.abs(values))) * 1.1 or 1.0
    line = np.array([-lim, lim])
    ax.plot(line, -line, color="black", lw=1, ls="--", label="y = −x: no self-repair")
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.text(0.97, 0.97, "self-repaired\n(Δlogit > −DE)", transform=ax.transAxes, ha="right", va="top",
            color="tab:green")
    ax.text(0.97, 0.03, "breakage\n(Δlogit < −DE)", transform=ax.transAxes, ha="right", va="bottom",
            color="tab:red")
    ax.text(0.03, 0.97, "no self-repair on the dashed line", transform=ax.transAxes, ha="left", va="top")
    ax.set_xlabel(f"mean clean DE of the head ({LOGIT_UNIT})")
    ax.set_ylabel(f"mean change in logit when ablated ({LOGIT_UNIT})")
    ax.set_title(f"Per-head DE against logit change, all tokens\n{ctx.facts()} (p unused: all tokens)")
    ax.legend(loc="lower left", fontsize=7)
    caption(fig, f"One point per head: {means}. Region labels read for heads with positive DE. "
                 "Under resample or mean ablation the head keeps part of its DE, so the no-repair "
                 "line for a single head is d_logit = d_de rather than −DE."
                 + (f" {ci_note()}." if yerr is not None else ""))
    return attach(fig, df)


def runs(ctx: Context) -> list[dict]:
    return [{"ablation": ctx.ablation, "sample": ctx.sample}]


FIGURE = FigureSpec(
    name="fig_de_vs_dlogit",
    title="Per-head DE against logit change",
    query="fig_head_de_vs_dlogit",
    runs=runs,
    plot=plot,
    paper=FigureSpec(
        name="fig_de_vs_dlogit_paper",
        title="Per-head DE against logit change (authors' statistic)",
        query="paper_head_de_vs_dlogit",
        runs=runs,
        plot=lambda df, ctx: plot(df, ctx, PAPER_MEANS),
    ),
)
