"""The fast ablation engine: a functional forward over processed weights.

A patched pass for a head in layer L starts from the cached clean residual entering
layer L (no upstream recompute), changes only that head's output in layer L (the other
heads' clean outputs are reused; in a parallel block the layer-L MLP is reused too),
batches every ablated head of the layer along the batch dimension, and never forms
full-vocabulary logits: it projects onto the target token's centred unembedding column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from selfrepair.ingest.weights import ModelWeights


def normalize(w: ModelWeights, x: Float[Tensor, "... d_model"]) -> tuple[Tensor, Tensor]:
    """Bare LayerNorm/RMSNorm (gains are folded). Returns (normalized, scale[..., 1])."""
    if w.norm == "LN":
        x = x - x.mean(-1, keepdim=True)
    scale = (x.pow(2).mean(-1, keepdim=True) + w.eps).sqrt()
    return x / scale, scale


def _rotate(w: ModelWeights, x: Float[Tensor, "batch head pos d_head"]) -> Tensor:
    if w.cos is None:
        return x
    pos, rot = x.shape[2], w.cos.shape[-1]
    cos, sin = w.cos[:pos], w.sin[:pos]  # [pos, rot], broadcast over batch and head
    half = rot // 2
    if rot == x.shape[-1]:  # full rotary (Llama): no pass-through part to stitch back
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


def attention_z(w: ModelWeights, layer: int, x_norm: Float[Tensor, "batch pos d_model"]) -> Tensor:
    """Each head's `hook_z` for normalized input. Returns [batch, pos, head, d_head]."""
    batch, pos, _ = x_norm.shape
    h, kv, dh = w.n_heads, w.n_kv, w.d_head
    qkv = x_norm @ w.W_QKV[layer]  # one GEMM for queries, keys and values
    if w.b_QKV is not None:
        qkv = qkv + w.b_QKV[layer]
    # [batch, pos, (h + 2kv)·d_head] -> [batch, head, pos, d_head] for SDPA.
    q, k, v = (t.view(batch, pos, -1, dh).transpose(1, 2) for t in qkv.split([h * dh, kv * dh, kv * dh], -1))
    q, k = _rotate(w, q), _rotate(w, k)
    # GQA: SDPA pairs query head i with key/value head i // (h / kv), as HF's repeat_kv does.
    z = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=1.0 / w.attn_scale, enable_gqa=kv != h
    )
    return z.transpose(1, 2)


def mlp_forward(w: ModelWeights, layer: int, x_norm: Tensor) -> tuple[Tensor, Tensor]:
    """Returns (hook_post [batch, pos, d_mlp], mlp_out [batch, pos, d_model])."""
    pre = x_norm @ w.W_in[layer]  # [gate | in] in one GEMM when gated
    if w.gated:
        gate, pre = pre.chunk(2, dim=-1)
        if w.b_in is not None:
            pre = pre + w.b_in[layer]
        post = w.act(gate) * pre
    else:
        post = w.act(pre if w.b_in is None else pre + w.b_in[layer])
    out = post @ w.W_out[layer]
    return post, out if w.b_out is None else out + w.b_out[layer]


def attn_out(w: ModelWeights, layer: int, z: Float[Tensor, "batch pos head d_head"]) -> Tensor:
    # [batch, pos, head·d_head] @ [head·d_head, d_model]: one GEMM over all heads.
    return z.flatten(-2) @ w.W_O[layer].flatten(0, 1) + w.b_O[layer]


@dataclass
class CleanState:
    """The engine's own clean run of one batch, the baseline of every patched pass."""

    resid_pre: Float[Tensor, "layer batch pos d_model"]
    z: Float[Tensor, "layer batch pos head d_head"]
    attn_out: Float[Tensor, "layer batch pos d_model"]
    mlp_out: Float[Tensor, "layer batch pos d_model"]
    resid_final: Float[Tensor, "batch pos d_model"]
    scale: Float[Tensor, "batch pos"]
    post_final: Float[Tensor, "batch pos d_mlp"]


def block(w: ModelWeights, layer: int, resid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One full block. Returns (resid_post, z, attn_out, mlp_post, mlp_out)."""
    x1, _ = normalize(w, resid)
    z = attention_z(w, layer, x1)
    a = attn_out(w, layer, z)
    mid = resid + a
    post, m = mlp_forward(w, layer, x1 if w.parallel else normalize(w, mid)[0])
    return mid + m, z, a, post, m


def embed(w: ModelWeights, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
    """The residual entering block 0 (token embedding, plus learned positions where present)."""
    resid = w.W_E[tokens]
    if w.W_pos is not None:
        resid = resid + w.W_pos[: tokens.shape[1]]
    return resid


def clean_run(w: ModelWeights, resid0: Float[Tensor, "batch pos d_model"]) -> CleanState:
    """Run every block from the embedding output, keeping what patched passes reuse."""
    resid, pres, zs, attns, mlps = resid0, [], [], [], []
    post = None
    for layer in range(w.n_layers):
        pres.append(resid)
        resid, z, a, post, m = block(w, layer, resid)
        zs.append(z), attns.append(a), mlps.append(m)
    _, scale = normalize(w, resid)
    return CleanState(
        torch.stack(pres), torch.stack(zs), torch.stack(attns), torch.stack(mlps),
        resid, scale[..., 0], post,
    )


@dataclass
class PatchResult:
    """What one patched pass yields for each ablated head (leading dim `k` = head in the pass).

    Every DE uses the clean final-norm scale, as DESIGN.md asks.
    """

    logit: Float[Tensor, "k batch pos"]  # ablated centred logit of the correct token, minus b_U
    scale: Float[Tensor, "k batch pos"]  # ablated final-norm scale
    de_head: Float[Tensor, "k batch pos"]  # the ablated head's own DE after patching
    d_de_heads: Float[Tensor, "k batch pos layer head"]  # ΔDE of every other head (0 where unchanged)
    d_de_mlps: Float[Tensor, "k batch pos layer"]  # ΔDE of every MLP layer
    post_final: Float[Tensor, "k batch pos d_mlp"]  # ablated final-MLP activations


def head_projections(w: ModelWeights, u: Float[Tensor, "batch pos d_model"]) -> Tensor:
    """`W_O[l, h] @ u` for every head: [layer, batch, pos, head, d_head].

    A head's DE is then one dot product with its z per token; computed once per batch
    and shared by every patched pass (the target column does not change under ablation).
    """
    return torch.einsum("lhdm,bpm->lbphd", w.W_O, u)


def patch_layer(
    w: ModelWeights,
    clean: CleanState,
    layer: int,
    heads: list[int],
    z_new: Float[Tensor, "k batch pos d_head"],
    u: Float[Tensor, "batch pos d_model"],
    ou: Float[Tensor, "layer batch pos head d_head"] | None = None,
) -> PatchResult:
    """Ablate each of `heads` (all in `layer`) by swapping its z for `z_new[i]`.

    Args:
        w: processed weights.
        clean: the batch's clean run from `clean_run`.
        layer: the layer of every ablated head.
        heads: head indices, one patched pass each, batched along the batch dimension.
        z_new: the replacement z for each head.
        u: the correct next token's centred unembedding column at every position.
        ou: `head_projections(w, u)`, when the caller already has it.

    Returns:
        Per-head results; positions without a next token carry garbage the caller drops.
    """
    k = len(heads)
    batch, pos = u.shape[:2]
    s = clean.scale  # [batch, pos]
    idx = torch.tensor(heads, device=u.device)
    z_clean_h = clean.z[layer][:, :, idx].permute(2, 0, 1, 3)  # [k, batch, pos, d_head]
    dz = z_new - z_clean_h
    # Only the ablated head's output moves in this layer: Δ = dz @ W_O[layer, h].
    delta = torch.einsum("kbpd,kdm->kbpm", dz, w.W_O[layer][idx])
    # The per-head projection W_O[l, h] @ u, so a head's DE is one dot product per token.
    d_de_heads = u.new_zeros((k, batch, pos, w.n_layers, w.n_heads))
    d_de_mlps = u.new_zeros((k, batch, pos, w.n_layers))
    if ou is None:
        ou = head_projections(w, u)
    # The ablated head's own change is d_de, not part of d_de_heads; other heads of this
    # layer read the clean residual, so their ΔDE is zero.
    de_head = (z_new * ou[layer][:, :, idx].permute(2, 0, 1, 3)).sum(-1) / s
    per_copy = lambda t: t.view(k, batch, *t.shape[1:])  # noqa: E731 - [k*batch, ...] -> [k, batch, ...]
    if w.parallel:
        # Parallel block: the layer-L MLP read the clean resid_pre, so it does not change.
        resid = (clean.resid_pre[layer] + clean.attn_out[layer] + clean.mlp_out[layer]) + delta
        resid = resid.reshape(k * batch, pos, -1)
        post = None
    else:
        mid = ((clean.resid_pre[layer] + clean.attn_out[layer]) + delta).reshape(k * batch, pos, -1)
        post, m = mlp_forward(w, layer, normalize(w, mid)[0])
        d_de_mlps[..., layer] = ((per_copy(m) - clean.mlp_out[layer]) * u).sum(-1) / s
        resid = mid + m
    for later in range(layer + 1, w.n_layers):
        x1, _ = normalize(w, resid)
        z = attention_z(w, later, x1)
        dz_l = per_copy(z) - clean.z[later]  # [k, batch, pos, head, d_head]
        d_de_heads[..., later, :] = (dz_l * ou[later]).sum(-1) / s.unsqueeze(-1)
        a = attn_out(w, later, z)
        mid = resid + a
        post, m = mlp_forward(w, later, x1 if w.parallel else normalize(w, mid)[0])
        d_de_mlps[..., later] = ((per_copy(m) - clean.mlp_out[later]) * u).sum(-1) / s
        resid = mid + m
    if post is None:  # ablated head sits in the last layer of a parallel model
        post = clean.post_final.expand(k, *clean.post_final.shape)
    _, s_abl = normalize(w, resid)
    s_abl = per_copy(s_abl[..., 0])
    logit = (per_copy(resid) * u).sum(-1) / s_abl
    return PatchResult(
        logit=logit.view(k, batch, pos),
        scale=s_abl.view(k, batch, pos),
        de_head=de_head,
        d_de_heads=d_de_heads,
        d_de_mlps=d_de_mlps,
        post_final=post.view(k, batch, pos, -1),
    )


def target_columns(w: ModelWeights, next_tokens: Int[Tensor, "batch pos"]) -> Tensor:
    """The centred unembedding column of each position's correct next token: [batch, pos, d_model]."""
    return w.W_U.T[next_tokens]
