"""Self-repair of each unit split into its measured channels: the final norm (closed form), the
intermediate norms (frozen-norms re-run), attention moving (frozen-attention re-run) and the rest.

Drawn only for models whose store holds counterfactual re-runs (`selfrepair ingest --counterfactuals`).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from selfrepair.analysis.context import Context
from selfrepair.analysis.spec import FigureSpec
from selfrepair.analysis.style import LOGIT_UNIT, attach, caption, new_figure

PARTS = (("ln_final", "final norm (closed form)", "tab:green"),
         ("ln_intermediate", "intermediate norms", "tab:olive"),
         ("attention", "attention moving", "tab:purple"),
         ("rest", "the rest", "tab:gray"))
SHOWN = 30  # units drawn: those with the largest clean DE


def plot(df: pl.DataFrame, ctx: Context):
    """Stacked bars per unit (the largest clean DEs, in layer order), self-repair as a dot."""
    rows = df.sort("de_clean", descending=True, nulls_last=True).head(SHOWN).sort("layer", "unit")
    fig, axes = new_figure(1, 1, figsize=(max(6.0, 0.35 * rows.height + 2), 4.4))
    ax = axes[0, 0]
    x = np.arange(rows.height)
    up, down = np.zeros(len(x)), np.zeros(len(x))
    for column, label, colour in PARTS:
        v = rows[column].fill_null(0.0).to_numpy()
        # Positive parts stack upwards from 0, negative ones downwards, so each bar shows its sign.
        base = np.where(v >= 0, up, down)
        ax.bar(x, v, bottom=base, width=0.7, color=colour, label=label)
        up, down = up + np.clip(v, 0, None), down + np.clip(v, None, 0)
    ax.plot(x, rows["sr"], color="black", marker="o", ms=4, lw=0, label="self-repair")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, rows["unit"].to_list(), rotation=90, fontsize=7)
    ax.set_ylabel(f"mean over re-run top tokens ({LOGIT_UNIT})")
    ax.legend(fontsize=7)
    fig.suptitle(f"Self-repair by channel, from counterfactual re-runs\n{ctx.facts()}", fontsize=9)
    caption(fig, "Means over each unit's top p% tokens (the ingest's top_p), units ablated alone; the "
                 f"{SHOWN} units with the largest clean DE. Final norm: (s/s_abl − 1)·Σ DE_abl; intermediate "
                 "norms: Δlogit − Δlogit[frozen norms] − final norm; attention moving: Δlogit − "
                 "Δlogit[frozen attention]; the rest: self-repair less the three (NULL parts drawn as 0).")
    return attach(fig, df)


FIGURE = FigureSpec(
    name="fig_repair_channels",
    title="Self-repair by measured channel (norms, attention, the rest)",
    query="head_repair_channels",
    runs=lambda ctx: [{"ablation": ctx.ablation, "sample": ctx.sample}],
    plot=plot,
    shown=lambda ctx: bool(ctx.model.counterfactuals),
)
