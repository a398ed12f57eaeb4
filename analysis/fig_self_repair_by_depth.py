"""Figure 1 of the paper: every head's self-repair on its top p% tokens against relative depth."""

from __future__ import annotations

import polars as pl

from selfrepair.analysis.context import Context
from selfrepair.analysis.errorbars import ci_err, ci_note
from selfrepair.analysis.spec import FigureSpec, headline_params
from selfrepair.analysis.style import LOGIT_UNIT, MODEL_COLOURS, attach, caption, new_figure


def plot(df: pl.DataFrame, ctx: Context):
    """Scatter of per-head self-repair (head_top_self_repair) with a per-layer mean line per model."""
    fig, axes = new_figure()
    ax = axes[0, 0]
    for i, model in enumerate(ctx.names):
        colour = MODEL_COLOURS[i % len(MODEL_COLOURS)]
        heads = df.filter(pl.col("model") == model)
        ax.scatter(heads["rel_depth"], heads["sr"], s=12, alpha=0.5, color=colour, label=f"{model} (heads)")
        ax.errorbar(heads["rel_depth"], heads["sr"], yerr=ci_err(heads, "sr"), fmt="none", ecolor=colour,
                    alpha=0.4, lw=0.7)
        # Mean over the layer's heads; each head has the same number of top tokens.
        layers = heads.group_by("rel_depth", maintain_order=True).agg(pl.col("sr").mean()).sort("rel_depth")
        ax.plot(layers["rel_depth"], layers["sr"], color=colour, lw=1.5, label=f"{model} (layer mean)")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("relative depth (layer / n_layers)")
    ax.set_ylabel(f"self-repair, mean over top p% tokens ({LOGIT_UNIT})")
    ax.set_title(f"Self-repair of each head on its top {ctx.p:.2%} tokens\n{ctx.facts()}")
    ax.legend(fontsize=7)
    caption(fig, "Each point is one head: the mean over its top p% tokens (by signed clean DE) of "
                 f"sr = d_logit − d_de. Lines: the mean over the layer's heads. {ci_note()}.")
    return attach(fig, df)


def plot_paper(df: pl.DataFrame, ctx: Context):
    """paper_layer_trend: the per-layer mean of each head's clipped repair fraction, one line per model."""
    fig, axes = new_figure()
    ax = axes[0, 0]
    for i, model in enumerate(ctx.names):
        rows = df.filter(pl.col("model") == model)
        ax.plot(rows["rel_depth"], rows["repair_fraction"] * 100, color=MODEL_COLOURS[i % len(MODEL_COLOURS)],
                lw=1.5, marker="o", ms=3, label=model)
    ax.set_ylim(-5, 105)
    ax.set_xlabel("relative depth (layer / n_layers)")
    ax.set_ylabel("self-repair fraction, clip((Δlogit + DE) / DE, 0, 1) (%)")
    ax.set_title(f"Self-repair fraction per layer (authors' statistic)\n{ctx.facts()} (p unused: all tokens)")
    ax.legend(fontsize=7)
    caption(fig, "Authors' statistic: per head, clip((Δlogit + DE) / DE, 0, 1) of its all-token means "
                 "(batch means over tokens with |DE| > 0), averaged over the layer's heads.")
    return attach(fig, df)


PAPER = FigureSpec(
    name="fig_self_repair_by_depth_paper",
    title="Self-repair fraction per layer (authors' statistic)",
    query="paper_layer_trend",
    runs=lambda ctx: [{"ablation": ctx.ablation, "sample": ctx.sample}],
    plot=plot_paper,
    per_model=False,
)

FIGURE = FigureSpec(
    name="fig_self_repair_by_depth",
    title="Self-repair against relative depth",
    query="head_top_self_repair",
    runs=lambda ctx: [headline_params(ctx)],
    plot=plot,
    per_model=False,
    paper=PAPER,
)
