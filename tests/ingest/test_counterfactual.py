"""Counterfactual re-runs (frozen norms, frozen attention) against plain transformers with hooks.

The reference uses no project code: forward hooks on the Hugging Face norm modules that divide by the
clean run's scale, and an attention function registered through transformers' own AttentionInterface
that multiplies the clean run's eager probabilities into the recomputed values. The ablation is a
resample of one head's o_proj input slice (raw z: the processed z differs by a constant, which a
resample keeps). Tiny GPT-2 (sequential, LayerNorm), GPT-NeoX (parallel) and Llama (RMSNorm, GQA),
with perturbed biases and gains.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_models

SEQ, BATCH = 12, 4
ATOL = 1e-4


def _attn(layer):
    for name in ("attn", "attention", "self_attn"):
        if hasattr(layer, name):
            return getattr(layer, name)
    raise AssertionError(type(layer))


def _o_proj(attn):
    for name in ("c_proj", "dense", "o_proj"):
        if hasattr(attn, name):
            return getattr(attn, name)
    raise AssertionError(type(attn))


def _layers(model):
    base = getattr(model, "transformer", None) or getattr(model, "gpt_neox", None) or model.model
    return list(base.h if hasattr(base, "h") else base.layers), (
        getattr(base, "ln_f", None) or getattr(base, "final_layer_norm", None) or base.norm)


def _norms(layer):
    return [m for m in layer.children() if "norm" in type(m).__name__.lower()]


def _scale(norm, x):
    """The norm's own scale on input x, written from its class (LayerNorm: centred; RMSNorm: not)."""
    x = x.float()
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon")
    if isinstance(norm, torch.nn.LayerNorm):
        x = x - x.mean(-1, keepdim=True)
    return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def _apply_frozen(norm, x, s):
    x = x.float()
    if isinstance(norm, torch.nn.LayerNorm):
        return (x - x.mean(-1, keepdim=True)) / s * norm.weight + norm.bias
    return norm.weight * (x / s)  # LlamaRMSNorm


def plain_reference(model, rows, src_rows, layer, head, frozen: str):
    """Centred correct-token logit change of a resample ablation of (layer, head) with frozen norms or
    attention, and the clean final-norm scale: plain transformers and hooks only."""
    from transformers import AttentionInterface

    layers, final = _layers(model)
    n_heads = model.config.num_attention_heads
    d_head = model.config.hidden_size // n_heads
    norms = [n for l in layers for n in _norms(l)] + [final]
    scales, zs, probs = {}, {}, {}

    def rec_scale(m, a, o):
        scales[m] = _scale(m, a[0]).detach()

    def rec_z(i):
        return lambda m, a: zs.__setitem__(i, a[0].detach().clone())

    hs = [n.register_forward_hook(rec_scale) for n in norms]
    hs += [_o_proj(_attn(l)).register_forward_pre_hook(rec_z(i)) for i, l in enumerate(layers)]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(rows, output_attentions=True, use_cache=False)
    for h in hs:
        h.remove()
    clean_logits = out.logits.float()
    probs = [a.detach() for a in out.attentions]
    clean_scales = dict(scales)
    with torch.no_grad():
        src_z = {}
        hs = [_o_proj(_attn(layers[layer])).register_forward_pre_hook(lambda m, a: src_z.__setitem__(0, a[0].clone()))]
        model(src_rows, use_cache=False)
        for h in hs:
            h.remove()

    def ablate(m, a):
        x = a[0].clone()
        sl = slice(head * d_head, (head + 1) * d_head)
        x[..., sl] = src_z[0][..., sl]
        return (x, *a[1:])

    hs = [_o_proj(_attn(layers[layer])).register_forward_pre_hook(ablate)]
    if frozen == "frozen-norms":
        for n in [n for l in layers[layer:] for n in _norms(l)] + [final]:
            hs.append(n.register_forward_hook(lambda m, a, o, n=n: _apply_frozen(n, a[0], clean_scales[n]).to(o.dtype)))
    else:
        index = {id(_attn(l)): i for i, l in enumerate(layers)}

        def frozen_fn(module, query, key, value, attention_mask, **kw):
            i = index[id(module)]
            p = probs[i] if i >= layer else None
            if p is None:  # upstream of the ablated layer: the clean pattern is the run's own anyway
                p = probs[i]
            v = value.repeat_interleave(p.shape[1] // value.shape[1], dim=1)
            return (p @ v).transpose(1, 2).contiguous(), p

        AttentionInterface.register("test_frozen", frozen_fn)
        model.set_attn_implementation("test_frozen")
    try:
        with torch.no_grad():
            logits = model(rows, use_cache=False).logits.float()
    finally:
        for h in hs:
            h.remove()
        model.set_attn_implementation("sdpa")
    y = rows.roll(-1, 1)
    centred = lambda lg: lg.gather(-1, y[..., None])[..., 0] - lg.mean(-1)  # noqa: E731
    return centred(logits) - centred(clean_logits), clean_scales[final][..., 0]


@pytest.fixture(scope="module")
def families():
    out = {}
    for fam in tiny_models.FAMILIES:
        out[fam] = tiny_models.build(fam)
    return out


@pytest.mark.parametrize("frozen", ["frozen-norms", "frozen-attention"])
@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_against_plain_hooks(families, family, frozen):
    from selfrepair.ingest.ablate import FastBatch, ablation_tables
    from selfrepair.ingest.weights import read_weights
    from selfrepair.store.labels import parse_units

    model = families[family]
    model.set_attn_implementation("sdpa")
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 256, (BATCH, SEQ), generator=g)
    src_rows = rows.roll(1, 0)
    w = read_weights(model, SEQ)
    preds = SEQ - 1
    layer, head = 0, 1
    unit = parse_units(f"L{layer}H{head}", w.n_layers, w.n_heads)[0]
    # Top tokens in rows 1 and 2 only, the last at position 7: the re-run cuts rows and positions.
    top = np.array([1 * preds + 2, 1 * preds + 5, 2 * preds + 7])
    tables = ablation_tables(FastBatch(w, rows), FastBatch(w, src_rows), "resample", 0, [unit], rows, 0,
                             {unit.label: top}, 0, 4, w, counterfactuals=(frozen,))
    got = tables["counterfactual_runs"].to_pandas()
    assert set(got.counterfactual) == {frozen} and list(got.token_index) == list(top)
    want, s_clean = plain_reference(model, rows, src_rows, layer, head, frozen)
    r, p = top // preds, top % preds
    np.testing.assert_allclose(got.d_logit, want[r, p].numpy(), atol=ATOL, rtol=1e-4)
    plain = tables["ablation_effects"].to_pandas().set_index("token_index").d_logit.loc[top].to_numpy()
    assert np.abs(got.d_logit.to_numpy() - plain).max() > 1e-3  # the freezing changed something
    if frozen == "frozen-norms":  # the final norm divides by the clean scale
        np.testing.assert_allclose(got.ln_scale, s_clean[r, p].numpy(), rtol=1e-5)
        # Nothing rescales: the change in logit is exactly the sum of the changes in DE.
        np.testing.assert_allclose(got.d_logit, got.de - got.de_base + got.d_de_heads + got.d_de_mlps, atol=ATOL)
    src = tables["counterfactual_sources"].to_pandas()
    sums = src.groupby("token_index").d_de.sum()
    np.testing.assert_allclose(sums.loc[top].to_numpy(), got.d_de_heads + got.d_de_mlps, atol=ATOL)
