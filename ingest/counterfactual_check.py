"""The self-check of counterfactual re-runs: the engine's cut re-run against one whole forward of the model.

For one sample head and the next head of its layer (sharing passes, as a layer's units do) and the first
ablation type, a few tokens in the second half of the batch's rows (so the re-run cuts rows and
positions, as on real top tokens) are re-run by `counterfactual.batch_reruns`
and compared with a plain forward of the Hugging Face model with hooks: the head's o_proj input
patched; for frozen-norms every norm module downstream (and the final norm, and the query/key norms
inside attention) dividing by the scale it had in a clean hooked forward; for frozen-attention every attention module fed the probabilities an
eager clean forward returned (`output_attentions`), through an attention function of this module's own.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from selfrepair.ingest.conventions import PROCESSED
from selfrepair.ingest.counterfactual_rules import FROZEN_NORMS
from selfrepair.ingest.families import module_at
from selfrepair.ingest.qk_norms import frozen_output, norm_scale, qk_norm_modules

_CHECK_IMPL = "selfrepair_check_frozen"


def check_tokens(batch: int, preds: int) -> np.ndarray:
    """Batch-local token indices the check re-runs: the second half of the rows, positions up to two thirds."""
    rows = np.arange(batch // 2, batch)
    pos = np.arange(0, max(1, (2 * preds) // 3), 2)
    return (rows[:, None] * preds + pos[None, :]).reshape(-1)


def _norm_modules(w) -> list:
    return [module for norms in w.layer_norms for _, module, _ in norms] + [module_at(w.model, w.family.final_norm)]


def _norm_params(w) -> list:
    return [norm for norms in w.layer_norms for _, _, norm in norms] + [w.final]


@contextlib.contextmanager
def _hooked(regs):
    handles = [r() for r in regs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _logit(w, rows, regs, attn=None):
    """The model's centred pre-softcap correct-token logit minus b_U, under the hooks `regs`."""
    from selfrepair.ingest.selfcheck import model_logit, unit_final_gain

    raw = {}
    regs = list(regs) + [lambda: w.model.get_output_embeddings().register_forward_hook(
        lambda m, a, o: raw.__setitem__("r", o.float()))]
    cfg = w.model.config
    saved = cfg._attn_implementation
    try:
        if attn is not None:
            cfg._attn_implementation = attn
        with torch.no_grad(), _hooked(regs), unit_final_gain(w):
            w.model(rows, use_cache=False)
    finally:
        cfg._attn_implementation = saved
    y = rows.roll(-1, dims=1)
    return model_logit(w, raw["r"].reshape(*rows.shape, -1) * w.logit_scale, y) - w.b_U[y]


def whole_forward_counterfactual(w, rows, layer: int, head: int, z_new, name: str) -> torch.Tensor:
    """The counterfactual's ablated logit of (layer, head) replaced by `z_new` (processed), [batch, pos]."""
    batch, pos = rows.shape
    norms, params = _norm_modules(w), _norm_params(w)

    def patch(module, args):
        x = args[0].clone()
        x.view(batch, pos, w.n_heads, w.d_head)[:, :, head] = z_new + w.c[layer, head]
        return (x, *args[1:])

    regs = [lambda: w.attn_out[layer].register_forward_pre_hook(patch)]
    if name == FROZEN_NORMS:
        scales = {}
        rec = [lambda m=m, n=n: m.register_forward_pre_hook(
            lambda mod, a, n=n, m=m: scales.__setitem__(id(m), n.scale(a[0]).detach())) for m, n in zip(norms, params)]
        # The norms inside attention (queries', keys'), where the family has them: recorded and frozen alike.
        qk = [m for ms in qk_norm_modules(w)[layer:] for m in ms]
        rec += [lambda m=m: m.register_forward_pre_hook(
            lambda mod, a: scales.__setitem__(id(mod), norm_scale(mod, a[0]).detach())) for m in qk]
        with torch.no_grad(), _hooked(rec):
            w.model(rows, use_cache=False)
        regs += [lambda m=m: m.register_forward_hook(lambda mod, a, o: frozen_output(mod, a[0], o, scales[id(mod)]))
                 for m in qk]
        downstream = {id(m) for norms_ in w.layer_norms[layer:] for _, m, _ in norms_} | {id(norms[-1])}
        final = id(norms[-1])

        def frozen(mod, a, o, n):
            x = a[0].float()
            if n.kind == "LN":
                x = x - x.mean(-1, keepdim=True)
            # Under UNFOLDED the stored logit is the model's with its final gain set to 1 (`unit_final_gain`).
            gain = n.gain if w.convention == PROCESSED or id(mod) != final else torch.ones_like(n.gain)
            return (x / scales[id(mod)][..., None] * gain + n.bias).to(o.dtype)
        regs += [lambda m=m, n=n: m.register_forward_hook(lambda mod, a, o, n=n: frozen(mod, a, o, n))
                 for m, n in zip(norms, params) if id(m) in downstream]
        return _logit(w, rows, regs)
    from transformers import AttentionInterface

    cfg = w.model.config
    saved = cfg._attn_implementation
    try:
        cfg._attn_implementation = "eager"
        with torch.no_grad():
            probs = [a.detach().float() for a in w.model(rows, output_attentions=True, use_cache=False).attentions]
    finally:
        cfg._attn_implementation = saved
    parent = w.family.attn_out.rsplit(".", 1)[0]
    index = {id(module_at(layer_, parent)): i for i, layer_ in enumerate(w.layers)}

    def attend(module, query, key, value, attention_mask, **kwargs):
        p = probs[index[id(module)]]
        v = value.float().repeat_interleave(p.shape[1] // value.shape[1], dim=1)
        return (p @ v).to(value.dtype).transpose(1, 2).contiguous(), p

    AttentionInterface.register(_CHECK_IMPL, attend)
    return _logit(w, rows, regs, attn=_CHECK_IMPL)


def counterfactual_checks(record, w, rows, fast, fast_src, kind: str, names, layer: int, head: int, u_full) -> None:
    """Record `<name> <kind> L{layer}H{h}: cut re-run vs full model forward` for each counterfactual, for the
    sample head and (with more than one head) the next head of its layer, re-run together on the same tokens:
    the two share their passes (`counterfactual_rules.pass_groups`), as a layer's units do in the ingest."""
    from selfrepair.ingest.ablate import unit_patch
    from selfrepair.ingest.counterfactual import batch_reruns
    from selfrepair.store.labels import parse_units

    batch, seq = rows.shape
    preds = seq - 1
    heads = [head] + ([(head + 1) % w.n_heads] if w.n_heads > 1 else [])
    units = parse_units(",".join(f"L{layer}H{h}" for h in heads), w.n_layers, w.n_heads)
    toks = check_tokens(batch, preds)
    for r in batch_reruns(w, fast, units, {unit.label: toks for unit in units}, names,
                          lambda u: unit_patch(fast, fast_src, kind, u, w.n_heads), u_full, 0, preds):
        z = unit_patch(fast, fast_src, kind, r.unit, w.n_heads).heads[layer][r.unit.head]
        want = whole_forward_counterfactual(w, rows, layer, r.unit.head, z, r.name)[:, :preds].reshape(-1)[toks]
        # A re-run may overflow float32 (frozen norms on some models; such tokens are never stored): the whole
        # forward must overflow at the same tokens, and the values agree where both are numbers.
        got, ok = r.logit, torch.isfinite(r.logit) & torch.isfinite(want)
        if not torch.equal(torch.isfinite(got), torch.isfinite(want)):
            got = got + float("inf")  # the re-run and the forward disagree on which tokens overflow: fails
        record(f"{r.name} {kind} {r.unit.label}: cut re-run vs full model forward", torch.where(ok, got, 0.0),
               torch.where(ok, want, 0.0))
