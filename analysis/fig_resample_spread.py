"""Spread of each head's self-repair across resample draws."""

from __future__ import annotations

import numpy as np
import polars as pl

from selfrepair.analysis.context import Context, head_label
from selfrepair.analysis.spec import FigureSpec
from selfrepair.analysis.style import LOGIT_UNIT, attach, caption, new_figure

MAX_LABELS = 40


def skip(ctx: Context) -> str | None:
    if "resample" not in ctx.model.ablations:
        return f"resample ablation was not ingested for {ctx.model.name}"
    if ctx.model.resamples < 2:
        return f"only one resample draw was ingested for {ctx.model.name} (ingest with --resamples K > 1)"
    return None


def plot(df: pl.DataFrame, ctx: Context):
    """fig_resample_spread: each draw's mean self-repair per head, the range as a bar."""
    heads = df.select("layer", "head").unique().sort("layer", "head")
    index = {key: i for i, key in enumerate(heads.iter_rows())}
    x = np.array([index[key] for key in df.select("layer", "head").iter_rows()])
    fig, axes = new_figure(figsize=(max(7.5, 0.03 * heads.height + 6), 4.5))
    ax = axes[0, 0]
    spread = df.group_by("layer", "head").agg(pl.col("sr").min().alias("lo"), pl.col("sr").max().alias("hi"))
    spread = spread.sort("layer", "head")
    ax.vlines(np.arange(heads.height), spread["lo"], spread["hi"], color="grey", lw=1)
    ax.scatter(x, df["sr"], c=df["sample"], cmap="viridis", s=8, zorder=3)
    step = max(1, int(np.ceil(heads.height / MAX_LABELS)))
    labels = [head_label(l, h) for l, h in heads.iter_rows()]
    ax.set_xticks(np.arange(heads.height)[::step], labels[::step], rotation=90, fontsize=6)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("ablated head")
    ax.set_ylabel(f"self-repair, mean over top p% tokens ({LOGIT_UNIT})")
    ax.set_title(f"Self-repair across {ctx.model.resamples} resample draws\n{ctx.facts(ablation='resample')}")
    caption(fig, "One point per head and draw (colour: draw); bars span the draws' range.")
    return attach(fig, df)


FIGURE = FigureSpec(
    name="fig_resample_spread",
    title="Spread across resample draws",
    query="fig_resample_spread",
    runs=lambda ctx: [{"p": ctx.p}],
    plot=plot,
    skip=skip,
)
