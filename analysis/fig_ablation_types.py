"""The same head under resample, mean and zero ablation, side by side."""

from __future__ import annotations

import polars as pl

from selfrepair.analysis.context import Context, head_label
from selfrepair.analysis.fig_token_noise import scatter_tokens
from selfrepair.analysis.spec import FigureSpec
from selfrepair.analysis.style import LOGIT_UNIT, attach, caption, new_figure

ORDER = ("resample", "mean", "zero")


def ablations(ctx: Context) -> list[str]:
    """The model's ingested ablation types in the paper's order."""
    kinds = ctx.model.ablations
    return [k for k in ORDER if k in kinds] + sorted(k for k in kinds if k not in ORDER)


def skip(ctx: Context) -> str | None:
    if len(ablations(ctx)) < 2:
        return f"only one ablation type ({', '.join(ctx.model.ablations)}) was ingested for {ctx.model.name}"
    return None


def common_tokens(df: pl.DataFrame, kinds: list[str]) -> tuple[pl.DataFrame, int]:
    """The rows of the tokens every ablation type covers (a partial store's types may cover different
    tokens), and how many rows were left out."""
    common = df.group_by("token_index").agg(pl.col("ablation").n_unique().alias("n"))
    keep = common.filter(pl.col("n") == len(kinds))["token_index"]
    out = df.filter(pl.col("token_index").is_in(keep.implode()))
    return out, df.height - out.height


def plot(df: pl.DataFrame, ctx: Context):
    """One head_tokens panel per ablation type, on shared axes."""
    kinds = ablations(ctx)
    layer, head = ctx.focus_head
    df, dropped = common_tokens(df, kinds)
    fig, axes = new_figure(1, len(kinds), figsize=(3.2 * len(kinds), 3.6), sharex=True, sharey=True)
    for i, kind in enumerate(kinds):
        ax = axes[0, i]
        scatter_tokens(ax, df.filter(pl.col("ablation") == kind), f"{kind} ablation")
        ax.set_xlabel(f"clean DE ({LOGIT_UNIT})")
    axes[0, 0].set_ylabel(f"Δlogit ({LOGIT_UNIT})")
    axes[0, 0].legend(fontsize=7)
    facts = ctx.facts(ablation="/".join(kinds))
    fig.suptitle(f"{head_label(layer, head)} under each ablation type\n{facts}", fontsize=9)
    common = f" Only the {df['token_index'].n_unique():,} tokens every type covers" + (
        f" ({dropped:,} token-ablations of a partial store left out)." if dropped else ".")
    caption(fig, "One point per token; orange: the head's top p% tokens. Same head, three ways of removing it."
            + common)
    return attach(fig, df)


FIGURE = FigureSpec(
    name="fig_ablation_types",
    title="One head under each ablation type",
    query="head_tokens",
    runs=lambda ctx: [{"layer": ctx.focus_head[0], "head": ctx.focus_head[1], "p": ctx.p, "ablation": kind,
                       "sample": ctx.sample} for kind in ablations(ctx)],
    plot=plot,
    skip=skip,
)
