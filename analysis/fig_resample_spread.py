"""Spread of each head's self-repair across resample draws."""

from __future__ import annotations

import numpy as np
import polars as pl
from matplotlib import colormaps

from selfrepair.analysis.context import Context, head_label
from selfrepair.analysis.errorbars import ci_err, ci_note
from selfrepair.analysis.spec import FigureSpec
from selfrepair.analysis.style import LOGIT_UNIT, attach, caption, new_figure

MAX_LABELS = 40
# One colour per draw, each dark enough to read on white (tab10 without its grey, olive and cyan); more
# draws cycle through them with another marker.
DRAW_COLOURS = tuple(colormaps["tab10"].colors[i] for i in (0, 1, 2, 3, 4, 5, 6))
DRAW_MARKERS = ("o", "s", "^", "D")


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
    ax.vlines(np.arange(heads.height), spread["lo"], spread["hi"], color="grey", lw=1, label="range of the draws")
    for i, sample in enumerate(sorted(df["sample"].unique().to_list())):
        rows = df["sample"] == sample
        ax.scatter(x[rows.to_numpy()], df.filter(rows)["sr"], s=10, zorder=3, label=f"draw {sample}",
                   color=DRAW_COLOURS[i % len(DRAW_COLOURS)],
                   marker=DRAW_MARKERS[(i // len(DRAW_COLOURS)) % len(DRAW_MARKERS)])
    pooled = df.unique(["layer", "head"], keep="first").sort("layer", "head")
    if "sr_draws" in pooled.columns:
        ax.errorbar(np.arange(heads.height) + 0.25, pooled["sr_draws"], yerr=ci_err(pooled.rename(
            {"sr": "sr_one", "sr_draws": "sr"}), "sr"), fmt="_", color="black", ms=6, lw=0.8, capsize=1.5,
            zorder=4, label="mean over draws, CI over rows and draws")
    step = max(1, int(np.ceil(heads.height / MAX_LABELS)))
    labels = [head_label(l, h) for l, h in heads.iter_rows()]
    ax.set_xticks(np.arange(heads.height)[::step], labels[::step], rotation=90, fontsize=6)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("ablated head")
    ax.set_ylabel(f"self-repair, mean over top p% tokens ({LOGIT_UNIT})")
    ax.set_title(f"Self-repair across {ctx.model.resamples} resample draws\n{ctx.facts(ablation='resample')}")
    ax.legend(fontsize=7, ncols=2)
    dropped = int(df["n_dropped"].sum()) if "n_dropped" in df.columns else 0
    common = (f" Over the tokens every draw covers ({dropped} stored token-draws of a partial store left out)."
              if dropped else " Over the tokens every draw covers.")
    caption(fig, "One point per head and draw (colour and marker: draw); grey bars span the draws' range; black: "
                 f"the mean over draws. {ci_note()} and draws.{common}")
    return attach(fig, df)


FIGURE = FigureSpec(
    name="fig_resample_spread",
    title="Spread across resample draws",
    query="fig_resample_spread",
    runs=lambda ctx: [{"p": ctx.p}],
    plot=plot,
    skip=skip,
)
