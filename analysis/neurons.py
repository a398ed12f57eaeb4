"""Shared parts of the final-MLP neuron figures: parameters and a note on what was kept."""

from __future__ import annotations

from selfrepair.analysis.context import Context, head_label
from selfrepair.analysis.penultimate import layer_text


def head_params(ctx: Context) -> dict:
    """layer, head, ablation and sample of the focus head, and p: the ingest's top_p (its neuron rows)."""
    layer, head = ctx.focus_head
    return {"layer": layer, "head": head, "p": ctx.model.top_p, "ablation": ctx.ablation, "sample": ctx.sample}


def head_title(ctx: Context, what: str) -> str:
    layer, head = ctx.focus_head
    return f"{what} — ablated head {head_label(layer, head)}, its top {ctx.p:.2%} tokens\n{ctx.facts()}"


def paper_params(ctx: Context) -> dict:
    """layer, head, ablation and sample of the authors' neuron figures: a penultimate-layer head."""
    layer, head = ctx.paper_head
    return {"layer": layer, "head": head, "ablation": ctx.ablation, "sample": ctx.sample}


def paper_title(ctx: Context, what: str) -> str:
    layer, head = ctx.paper_head
    return (f"{what} — ablated head {head_label(layer, head)} ({_paper_layer(ctx)}), its top {ctx.p:.2%} tokens "
            f"by sr_mlps (authors' token set)\n{ctx.facts()}")


def _paper_layer(ctx: Context) -> str:
    """Which layer the paper head is in and why (the authors drew the penultimate layer's heads)."""
    has_detail = ctx.paper_head in set(ctx.model.sr_heads)
    return layer_text(ctx, ctx.paper_head[0], "ablated heads with neuron detail by sr_mlps" if has_detail
                      else "ablated heads")


def paper_skip(ctx: Context) -> str | None:
    if ctx.paper_head is None:
        return f"{ctx.model.name} has no head ablated alone in this draw (the authors' neuron figures' heads)"
    return None


PAPER_NOTE = ("Authors' token set: the head's top p% tokens by sr_mlps (its ΔDE of every MLP layer), which "
              "needs the ingest's --sr-mlps-neurons for the head; neurons ranked by signed repair.")


KEPT_NOTE = ("Neurons are ranked by signed repair among all final-MLP neurons (neuron_effects.rank, the top "
             "and bottom k kept at ingest); p is the ingest's top_p.")
