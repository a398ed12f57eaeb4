"""Shared parts of the final-MLP neuron figures: parameters and a note on what was kept."""

from __future__ import annotations

from selfrepair.analysis.context import Context, head_label


def head_params(ctx: Context) -> dict:
    """layer, head, ablation and sample of the focus head, and p: the ingest's top_p (its neuron rows)."""
    layer, head = ctx.focus_head
    return {"layer": layer, "head": head, "p": ctx.model.top_p, "ablation": ctx.ablation, "sample": ctx.sample}


def head_title(ctx: Context, what: str) -> str:
    layer, head = ctx.focus_head
    return f"{what} — ablated head {head_label(layer, head)}, its top {ctx.p:.2%} tokens\n{ctx.facts()}"


KEPT_NOTE = ("Neurons are ranked by signed repair among all final-MLP neurons (neuron_effects.rank, the top "
             "and bottom k kept at ingest); p is the ingest's top_p.")
