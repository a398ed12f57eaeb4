"""The shapes of the registry: a figure or table, the named query it reads, its parameters.

`fetch` is the one place a figure's data comes from: it runs the named query once per
parameter set (a figure of four heads runs `head_tokens` four times), keeps the models
the figure draws, and adds each run's parameters as columns when the query does not
already return them, so the frames of several runs can be told apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import polars as pl
from matplotlib.figure import Figure

from selfrepair.analysis.context import Context

Runs = Callable[[Context], list[dict]]


@dataclass(frozen=True)
class FigureSpec:
    """One figure of the report.

    Args:
        name: the module's name, also the file stem under `figures/`.
        title: a short title for the report's contents.
        query: the named query it reads (`queries/sql/<query>.sql`).
        runs: the query's parameter sets for a context, one run each.
        plot: draws the (concatenated) query frame; returns the Figure.
        per_model: one figure per model (True) or one for all models.
        skip: a reason to draw nothing for a context (e.g. one ablation type), or None.
        paper: where the authors computed this figure's statistic differently (Rushing & Nanda's
            code), the figure drawn with theirs; the report shows it beside this one.
        shown: whether a context has anything for this figure at all (None: always); when False the
            report leaves the figure out without a note (a figure of units a store does not hold).
        html: the figure also as HTML (the drawn frame, context -> HTML), shown under the image in the
            report, e.g. a map whose cells tell their numbers on hover (None: the image only).
    """

    name: str
    title: str
    query: str
    runs: Runs
    plot: Callable[[pl.DataFrame, Context], Figure]
    per_model: bool = True
    skip: Callable[[Context], str | None] | None = None
    paper: "FigureSpec | None" = None
    shown: Callable[[Context], bool] | None = None
    html: Callable[[pl.DataFrame, Context], str] | None = None


@dataclass(frozen=True)
class TableSpec:
    """One paper table: a named query (usable with `selfrepair export`) and its parameters."""

    name: str
    title: str
    query: str
    runs: Runs


def headline_params(ctx: Context) -> dict:
    """p, ablation and sample: the parameters of the per-head and per-layer summaries."""
    return {"p": ctx.p, "ablation": ctx.ablation, "sample": ctx.sample}


def fetch(query: Callable[..., pl.DataFrame], name: str, runs: list[dict], models: list[str],
          label_runs: bool = True) -> pl.DataFrame:
    """The frame a figure draws.

    Args:
        query: `Store.query` (or a caching wrapper around it).
        name: the named query.
        runs: its parameter sets.
        models: keep these models' rows (the `model` or `Model` column).
        label_runs: add each run's parameters as columns (not for paper tables).

    Returns:
        The runs' frames, each filtered to `models`, stacked in run order.
    """
    frames = []
    for params in runs:
        df = query(name, **params)
        key = "model" if "model" in df.columns else "Model"
        df = df.filter(pl.col(key).is_in(models))
        extra = [pl.lit(v).alias(k) for k, v in params.items() if label_runs and k not in df.columns]
        frames.append(df.with_columns(extra) if extra else df)
    if not frames:
        return pl.DataFrame()
    return pl.concat(frames, how="vertical_relaxed")
