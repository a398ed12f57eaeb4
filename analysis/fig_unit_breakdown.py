"""Self-repair of each attention layer, MLP and block against depth, split into heads, MLPs and
LayerNorm: the Hydra effect's figure (McGrath et al. 2023) for the layer units a store holds.

Drawn only for models whose store holds ATTN, MLP or BLOCK units ablated alone (`Context`'s
`unit_kinds`); a store of heads alone draws the report as before, without this figure.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from selfrepair.analysis.context import Context
from selfrepair.analysis.spec import FigureSpec, headline_params
from selfrepair.analysis.style import LOGIT_UNIT, attach, caption, new_figure

KINDS = (("attn", "attention layers (ATTN)"), ("mlp", "MLPs"), ("block", "blocks (BLOCK)"))
PARTS = (("sr_heads", "sr heads", "tab:blue"), ("sr_mlps", "sr MLPs", "tab:orange"),
         ("sr_ln", "sr LayerNorm", "tab:green"))
UNIT_KINDS = tuple(k for k, _ in KINDS)


def plot(df: pl.DataFrame, ctx: Context):
    """One panel per stored layer-unit kind: stacked bars of the three parts per layer, the total
    self-repair and the direct effect lost (clean DE − ablated DE) as lines."""
    kinds = [(k, title) for k, title in KINDS if k in set(df["unit_kind"])]
    fig, axes = new_figure(1, len(kinds), figsize=(4.2 * len(kinds) + 1, 4.2), sharey=True)
    for ax, (kind, title) in zip(axes[0], kinds):
        rows = df.filter(pl.col("unit_kind") == kind).sort("layer")
        x = rows["layer"].to_numpy()
        up, down = np.zeros(len(x)), np.zeros(len(x))
        for column, label, colour in PARTS:
            v = rows[column].to_numpy()
            # Positive parts stack upwards from 0, negative ones downwards, so each bar shows its sign.
            base = np.where(v >= 0, up, down)
            ax.bar(x, v, bottom=base, width=0.7, color=colour, label=label)
            up, down = up + np.clip(v, 0, None), down + np.clip(v, None, 0)
        ax.plot(x, rows["sr"], color="black", marker="o", ms=4, lw=1.2, label="self-repair (sum)")
        ax.plot(x, rows["de_clean"] - rows["de_ablated"], color="tab:red", marker="s", ms=3, lw=1,
                ls="--", label="DE lost (clean − ablated)")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xlabel("layer of the ablated unit")
        ax.set_title(title, fontsize=9)
    axes[0, 0].set_ylabel(f"mean over each unit's top p% tokens ({LOGIT_UNIT})")
    axes[0, -1].legend(fontsize=7)
    fig.suptitle(f"Self-repair of each layer unit, split into heads, MLPs and LayerNorm\n{ctx.facts()}",
                 fontsize=9)
    caption(fig, "Means over each unit's top p% tokens (by the unit's signed clean DE, the sum of its "
                 "components'), not over all tokens; units ablated alone. sr = Δlogit − ΔDE = sr_heads + "
                 "sr_mlps + sr_ln, where heads and MLPs are those outside the unit (a block's own MLP "
                 "and heads are not counted).")
    return attach(fig, df)


FIGURE = FigureSpec(
    name="fig_unit_breakdown",
    title="Self-repair of attention layers, MLPs and blocks by depth",
    query="fig_unit_breakdown",
    runs=lambda ctx: [headline_params(ctx)],
    plot=plot,
    shown=lambda ctx: any(k in ctx.model.unit_kinds for k in UNIT_KINDS),
)
