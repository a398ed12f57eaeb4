"""Shared parts of the final-MLP neuron figures: parameters and a note on what was kept."""

from __future__ import annotations

from selfrepair.analysis.context import Context, head_label


def head_params(ctx: Context) -> dict:
    """layer, head, ablation and sample of the focus head."""
    layer, head = ctx.focus_head
    return {"layer": layer, "head": head, "ablation": ctx.ablation, "sample": ctx.sample}


def head_title(ctx: Context, what: str) -> str:
    layer, head = ctx.focus_head
    return f"{what} — ablated head {head_label(layer, head)}, its top {ctx.p:.2%} tokens\n{ctx.facts()}"


KEPT_NOTE = ("Only the final-MLP neurons kept at ingest (top k by |repair| per token, "
             "neuron_effects) enter; p is the ingest's top_p.")
