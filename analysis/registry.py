"""Every figure and table of the report, in the order the report shows them."""

from __future__ import annotations

from selfrepair.analysis import (
    fig_ablation_types,
    fig_anti_erasure,
    fig_backup_map,
    fig_de_vs_dlogit,
    fig_dlogit_vs_output,
    fig_final_mlp_share,
    fig_layer_breakdown,
    fig_ln_ratio_histogram,
    fig_ln_share_by_depth,
    fig_mlp_share_by_depth,
    fig_neuron_cumulative,
    fig_neuron_sparsity,
    fig_neuron_top_frequency,
    fig_repair_channels,
    fig_resample_spread,
    fig_self_repair_by_depth,
    fig_token_noise,
    fig_top_neurons_share,
    fig_training_steps,
    fig_unit_breakdown,
    table_head_breakdown,
    table_layer_breakdown,
)
from selfrepair.analysis.spec import FigureSpec, TableSpec

FIGURES: tuple[FigureSpec, ...] = (
    fig_self_repair_by_depth.FIGURE,   # 1
    fig_de_vs_dlogit.FIGURE,           # 2
    fig_token_noise.FIGURE,            # 3
    fig_ablation_types.FIGURE,         # 4
    fig_ln_ratio_histogram.FIGURE,     # 5
    fig_ln_share_by_depth.FIGURE,      # 6
    fig_mlp_share_by_depth.FIGURE,     # 7
    fig_layer_breakdown.FIGURE,        # 8
    fig_neuron_sparsity.FIGURE,        # 9
    fig_neuron_cumulative.FIGURE,      # 10
    fig_anti_erasure.FIGURE,           # 11
    fig_final_mlp_share.FIGURE,        # 12
    fig_top_neurons_share.FIGURE,      # 13
    fig_neuron_top_frequency.FIGURE,   # 14
    fig_backup_map.FIGURE,             # 15
    fig_resample_spread.FIGURE,        # 15, second part
    fig_unit_breakdown.FIGURE,         # units: the Hydra effect's figure (drawn only where stored)
    fig_training_steps.FIGURE,         # revisions: against training step (drawn only for >= 2 revisions of a model)
    fig_repair_channels.FIGURE,        # measured mechanisms (drawn only where counterfactuals are stored)
    fig_dlogit_vs_output.FIGURE,       # output metrics: logit change against loss change and KL (where stored)
)

TABLES: tuple[TableSpec, ...] = (
    table_layer_breakdown.TABLE,
    table_head_breakdown.TABLE,
)


def figure(name: str) -> FigureSpec:
    """The figure spec by name; KeyError lists the names."""
    for spec in FIGURES:
        if spec.name == name:
            return spec
    raise KeyError(f"no figure {name!r}; figures: {', '.join(s.name for s in FIGURES)}")
