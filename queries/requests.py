"""Refuse, with one line, a query for something the store never ingested.

A named query, `head` or `report` asked for an ablation, draw, head or model that is not
stored, or for p outside (0, 1], would otherwise answer with an empty table and exit 0.
These checks run on the manifests alone, before any SQL.
"""

from __future__ import annotations

from selfrepair.errors import ConfigError, QueryError
from selfrepair.store import labels
from selfrepair.store.inventory import Inventory
from selfrepair.store.top_tokens import top_count


def parse_head_label(text: str) -> tuple[int, int]:
    """`L26H6` -> (26, 6); anything else is refused with one line."""
    try:
        return labels.parse_head(text)
    except ConfigError:
        raise QueryError(f"head {text!r}: use a label like L26H6 (layer 26, head 6)") from None


def split_head_label(values: dict) -> dict:
    """`head=L26H6` (and `layer=L26`) become layer=26, head=6; other values pass through."""
    out = dict(values)
    head = out.get("head")
    if isinstance(head, str) and not head.strip().lstrip("+-").isdigit():
        layer, h = parse_head_label(head)
        if "layer" in out and str(out["layer"]).strip().lstrip("Ll") != str(layer):
            raise QueryError(f"head {head} and layer {out['layer']} disagree")
        out["layer"], out["head"] = layer, h
    layer = out.get("layer")
    if isinstance(layer, str):
        try:
            label = labels.parse_label(layer)
        except ConfigError:
            label = None  # not a label: the parameter's own type check refuses it
        if label is not None and label.head is None:
            out["layer"] = label.layer
    return out


def check(inventories: list[Inventory], params: dict, model: str | None = None) -> None:
    """Raise QueryError naming what is stored when `params` ask for something that is not.

    Args:
        inventories: every model of the store.
        params: bound values; checked when present: p, ablation, sample, layer, head.
        model: restrict the checks to this model (None: any model may hold it).
    """
    invs = inventories
    if model is not None:
        invs = [i for i in inventories if i.model == model]
        if not invs:
            raise QueryError(f"model {model!r} is not in this store; models: "
                             f"{', '.join(i.model for i in inventories)}")
    if "p" in params:
        p = params["p"]
        if not isinstance(p, (int, float)) or not (0 < p <= 1):
            raise QueryError(f"p = {p!r} is outside (0, 1]: p is the fraction of tokens kept per head, e.g. 0.02")
        if not any(top_count(p, i.n_tokens) >= 1 for i in invs):
            most = max(i.n_tokens for i in invs)
            raise QueryError(f"p = {p} keeps no token: floor(p × {most:,} tokens) = 0; use p ≥ {1 / most:.2g}")
    draws = [(i, d) for i in invs for d in i.draws]
    if "ablation" in params:
        kind = params["ablation"]
        kinds = sorted({d.ablation for _, d in draws})
        if kind not in kinds:
            raise QueryError(f"ablation {kind!r} was not ingested; this store has: {', '.join(kinds) or 'none'} "
                             "(add it with `selfrepair ingest --ablations …`)")
        draws = [(i, d) for i, d in draws if d.ablation == kind]
        if "sample" in params:
            sample = params["sample"]
            have = sorted({d.sample for _, d in draws})
            if sample not in have:
                raise QueryError(f"{kind} draw {sample!r} was not ingested; stored draws: "
                                 f"{', '.join(map(str, have))}")
            draws = [(i, d) for i, d in draws if d.sample == sample]
    if "layer" in params and not (isinstance(params["layer"], int) and params["layer"] < 0):
        layer = params["layer"]  # a negative layer is a query's own shorthand (e.g. -1: penultimate)
        if not isinstance(layer, int) or not any(0 <= layer < i.n_layers for i in invs):
            raise QueryError(f"layer {layer!r} is not a layer of "
                             + ", ".join(f"{i.model} (0..{i.n_layers - 1})" for i in invs))
        if "head" in params:
            head = params["head"]
            if not isinstance(head, int) or not any(0 <= head < i.n_heads for i in invs):
                raise QueryError(f"head {head!r} is not a head index of "
                                 + ", ".join(f"{i.model} (0..{i.n_heads - 1})" for i in invs))
            if draws and not any((layer, head) in d.heads for _, d in draws):
                stored = "; ".join(f"{i.model} {d.ablation} draw {d.sample}: {i.heads_text(d)}" for i, d in draws)
                raise QueryError(f"head L{layer}H{head} was not ablated; stored heads: {stored}")


# What a `-- needs:` header line may name, and what stores lack it (see `Store.named_sql`).
NEEDS = {
    "neuron_ranks": "final-MLP neuron ranks by signed change in DE (neuron_effects.rank and neuron_totals)",
    "output_metrics": "the output metrics (d_loss, kl, d_entropy, top1_changed of ablation_effects)",
    "counterfactuals": "counterfactual re-runs (counterfactual_runs)",
}
# Why a model's store can lack a need, where that is not only its age.
LACKS = {
    "output_metrics": "was ingested without (--output-metrics none, or a selfrepair before them); ingest that "
                      "model again with --output-metrics all",
    "counterfactuals": "was ingested without them; ingest that model again with --counterfactuals "
                       "frozen-norms,frozen-attention",
}


def check_needs(query: str, needs: tuple[str, ...], lacking: dict[str, list[str]]) -> None:
    """Refuse a named query whose `-- needs:` data some model's store predates.

    Args:
        query: the query's name, for the message.
        needs: its `-- needs:` names (keys of NEEDS).
        lacking: need -> the models whose store lacks it.
    """
    for need in needs:
        models = lacking.get(need) or []
        if models:
            why = LACKS.get(need, "predates; ingest that model again with this selfrepair version")
            raise QueryError(f"query '{query}' needs {NEEDS[need]}, which the store of {', '.join(models)} {why}")
