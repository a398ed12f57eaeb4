"""Self-repair against training step, for a model stored at several revisions (training checkpoints).

A revision is stored as its own model (`selfrepair ingest --model pythia-160m --revision step1000`:
folder `pythia-160m@step1000`, the manifest's model records the revision). Models whose names
share the part before `@` and that record a revision are one model's checkpoints; the figure is
drawn when some model has at least two. The x axis is the revision's training step (its last
number, as in Pythia's `step1000`); revisions without a number are placed in name order.
"""

from __future__ import annotations

import re

import polars as pl

from selfrepair.analysis.context import Context, ModelInfo
from selfrepair.analysis.spec import FigureSpec, headline_params
from selfrepair.analysis.style import LOGIT_UNIT, MODEL_COLOURS, attach, caption, new_figure

QUANTITIES = (("sr", "self-repair"), ("sr_heads", "heads"), ("sr_mlps", "MLPs"), ("sr_ln", "LayerNorm"),
              ("de_clean", "clean DE"))
STYLES = ("-", "--", ":", "-.")


def step_of(revision: str) -> int | None:
    """The training step a revision names: its last number (`step1000` -> 1000), or None."""
    numbers = re.findall(r"\d+", revision)
    return int(numbers[-1]) if numbers else None


def revision_groups(models: tuple[ModelInfo, ...]) -> dict[str, list[ModelInfo]]:
    """Base name -> its revisions (at least two), in step order (name order where a revision has no number)."""
    groups: dict[str, list[ModelInfo]] = {}
    for m in models:
        if m.revision is not None:
            groups.setdefault(m.name.split("@", 1)[0], []).append(m)
    out = {}
    for base, ms in sorted(groups.items()):
        if len(ms) >= 2:
            numbered = all(step_of(m.revision) is not None for m in ms)
            out[base] = sorted(ms, key=lambda m: (step_of(m.revision), m.name) if numbered else (0, m.name))
    return out


def plot(df: pl.DataFrame, ctx: Context):
    """fig_training_steps rows (one per model): each quantity against step, one line style per base model."""
    groups = revision_groups(ctx.models)
    fig, axes = new_figure()
    ax = axes[0, 0]
    drawn, numbered_all = [], True
    for g, (base, ms) in enumerate(groups.items()):
        numbered = all(step_of(m.revision) is not None for m in ms)
        numbered_all &= numbered
        xs = [step_of(m.revision) for m in ms] if numbered else list(range(len(ms)))
        rows = {r["model"]: r for r in df.iter_rows(named=True)}
        for i, (col, label) in enumerate(QUANTITIES):
            ys = [rows[m.name][col] if m.name in rows else None for m in ms]
            ax.plot(xs, [float("nan") if y is None else y for y in ys], STYLES[g % len(STYLES)], marker="o", ms=3,
                    color=MODEL_COLOURS[i % len(MODEL_COLOURS)], label=f"{label} ({base})" if len(groups) > 1 else label)
        if not numbered:
            ax.set_xticks(xs, [m.revision for m in ms], rotation=45, fontsize=7)
        drawn += [m.name for m in ms]
    steps = [step_of(m.revision) for ms in groups.values() for m in ms]
    if numbered_all and max(steps) > 100 * max(1, min(steps)):
        ax.set_xscale("symlog", linthresh=max(1, min(s for s in steps if s > 0) if any(steps) else 1))
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("training step (the revision's number)" if numbered_all else "revision")
    ax.set_ylabel(f"mean over each head's top p% tokens ({LOGIT_UNIT})")
    ax.set_title(f"Self-repair across training: {', '.join(groups)}\n{ctx.ablation} ablation · p = {ctx.p:g}")
    ax.legend(fontsize=7)
    caption(fig, "One point per stored revision (" + ", ".join(drawn) + "): means over every head's top p% tokens "
            "of self-repair, its heads/MLPs/LayerNorm parts and the clean DE.")
    return attach(fig, df)


FIGURE = FigureSpec(
    name="fig_training_steps",
    title="Self-repair against training step",
    query="fig_training_steps",
    runs=lambda ctx: [headline_params(ctx)],
    plot=plot,
    per_model=False,
    shown=lambda ctx: bool(revision_groups(ctx.models)),
)
