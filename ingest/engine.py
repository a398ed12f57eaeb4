"""The fast ablation engine: the model's own decoder layers, driven from the cached residual.

The clean run is one float32 forward of the Hugging Face model with hooks that keep what
every later pass reuses: the residual entering each layer and the exact arguments each
layer was called with (masks, rotary tables, ALiBi), each head's z, each MLP's write.

A patched pass for heads of layer L calls only layers L… on the cached residual entering
L, with every ablated head of the layer batched along the batch dimension, plus one
unpatched copy as the baseline. Every quantity of the ablated run is then the stored
clean value plus (patched − baseline), computed in float32. In bfloat16 or float16 only
the matrix products run in low precision, and only on the change: each projection
returns its clean float32 output plus a low-precision product with (input − clean
input); norms, attention, activations, the residual stream and the attention output
projection stay float32, so the identities hold exactly as in float32. Nothing projects onto the
full vocabulary: DEs are dot products with the target token's processed column `u`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from selfrepair.ingest import hook_names as H
from selfrepair.ingest.families import module_at
from selfrepair.ingest.layer_calls import Call, capture_calls, hooks
from selfrepair.ingest.weights import Weights


def _linears(w: Weights, layer: int) -> list:
    """The matrix products of one layer that may run in low precision: every projection but
    the attention output (kept float32, so the residual receives exactly Σ_h z_h @ W_O[h] + b)."""
    from transformers.pytorch_utils import Conv1D

    return [m for m in w.layers[layer].modules()
            if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not w.attn_out[layer]]


class _DeltaInDtype:
    """Run a projection as `clean output + low-precision W·(x − clean input)`, until `remove()`.

    Rounding whole activations to bfloat16 would swamp the small changes an ablation makes
    (on SmolLM2, 14% error in d_logit); rounding only the change keeps the error a small
    fraction of the change itself, while every product still runs in low precision.
    """

    def __init__(self, module, clean_x: Tensor, clean_y: Tensor, copies: int, dtype: torch.dtype, cache: dict):
        from transformers.pytorch_utils import Conv1D

        self.module = module
        key = (id(module), dtype)
        if key not in cache:  # the module's weight in low precision, made once per model
            cache[key] = module.weight.detach().to(dtype)
        weight, conv = cache[key], isinstance(module, Conv1D)
        tile = lambda t: t.repeat(copies, *[1] * (t.dim() - 1))  # noqa: E731 - copy-major, like the hidden state
        x0, y0 = tile(clean_x), tile(clean_y)

        def forward(x):
            d = (x.float() - x0).to(dtype)
            return y0 + (d @ weight if conv else torch.nn.functional.linear(d, weight)).float()

        module.forward = forward

    def remove(self) -> None:
        del self.module.forward  # the class's forward shows through again


@dataclass
class CleanState:
    """The float32 clean run of one batch, the baseline of every patched pass (processed z)."""

    calls: list[Call]
    resid_pre: Float[Tensor, "layer batch pos d_model"]
    z: Float[Tensor, "layer batch pos head d_head"]
    o_out: Float[Tensor, "layer batch pos d_model"] | None  # attention output before its post-norm
    attn_post_scale: Float[Tensor, "layer batch pos"] | None
    mlp_write: Float[Tensor, "layer batch pos d_model"]
    mlp_pre_final: Float[Tensor, "batch pos d_model"] | None  # final MLP output before its post-norm
    post_final_raw: Float[Tensor, "batch pos d_mlp"]
    resid_final: Float[Tensor, "batch pos d_model"]
    scale: Float[Tensor, "batch pos"]
    norm_scales: Float[Tensor, "batch pos norm"]
    logits: Float[Tensor, "batch pos d_vocab"]  # the model's own output (after any softcap)
    raw_logits: Float[Tensor, "batch pos d_vocab"]  # unembedding output before any softcap
    mlp_post_scale: Float[Tensor, "batch pos 1"] | None = None  # final MLP's post-norm scale
    linears: dict | None = None  # module -> (input, output) of every low-precision projection

    @property
    def post_final(self) -> Tensor:
        """Final-MLP activations, divided by the post-norm scale where there is one (gain is in W_out)."""
        return self.post_final_raw if self.mlp_post_scale is None else self.post_final_raw / self.mlp_post_scale

    def attn_bias_write(self, w: Weights) -> Float[Tensor, "layer batch pos d_model"]:
        """What each layer's attention writes besides its heads: b_O plus the folded value biases."""
        b = w.b_attn[:, None, None, :]
        if self.attn_post_scale is None:
            return b.expand(-1, *self.scale.shape, -1)
        g = torch.stack([n.gain for n in w.attn_post])[:, None, None, :]
        return g * b / self.attn_post_scale[..., None]


def clean_run(w: Weights, rows: Tensor, with_linears: bool = False) -> CleanState:
    """One float32 forward of the batch with everything later passes and the clean tables need.

    `with_linears` also keeps every projection's input and output, the baseline of a
    low-precision sweep.
    """
    L = w.n_layers
    got: dict = {}  # TransformerLens hook name -> the tensor that hook sees (ingest/hook_names.py)
    # Copies: some layers add into a module's output in place afterwards (Falcon's MLP).
    put = lambda key: (lambda m, a, o=None: got.__setitem__(key, (a[0] if o is None else o).detach().clone()))  # noqa: E731
    norm_keys = [[H.norm_in(i, role) for role in _norm_roles(w, i)] for i in range(L)]
    regs = []
    for i in range(L):
        regs.append(lambda i=i: w.attn_out[i].register_forward_pre_hook(put(H.z(i))))
        regs.append(lambda i=i: w.mlp_write[i].register_forward_hook(put(H.mlp_out(i))))
        if w.post_norm:
            regs.append(lambda i=i: w.attn_out[i].register_forward_hook(put(H.attn_out(i))))
        for (_, module, _), key in zip(w.layer_norms[i], norm_keys[i]):
            regs.append(lambda module=module, key=key: module.register_forward_pre_hook(put(key)))
    if w.mlp_post[-1] is not None:
        regs.append(lambda: w.mlp_out[-1].register_forward_hook(put(H.mlp_module_out(L - 1))))
    regs.append(lambda: w.down_final.register_forward_pre_hook(put(H.mlp_post(L - 1))))
    regs.append(lambda: module_at(w.model, w.family.final_norm).register_forward_pre_hook(put(H.resid_post(L - 1))))
    regs.append(lambda: w.model.get_output_embeddings().register_forward_hook(put(H.UNEMBED_OUT)))
    linears = {}
    if with_linears:
        keep = lambda m, a, o: linears.__setitem__(m, (a[0].detach().float().clone(), o.detach().float().clone()))  # noqa: E731
        regs += [lambda m=m: m.register_forward_hook(keep) for i in range(L) for m in _linears(w, i)]
    calls, inputs, out = capture_calls(w.model, w.layers, rows, regs)
    batch, pos = rows.shape
    f = lambda t: t.float().reshape(batch, pos, -1)  # noqa: E731 - some layers flatten [batch·pos, …] (OPT)
    z_hf = torch.stack([f(got[H.z(i)]).view(batch, pos, w.n_heads, w.d_head) for i in range(L)])
    o_out = torch.stack([f(got[H.attn_out(i)]) for i in range(L)]) if w.post_norm else None
    resid_final = f(got[H.resid_post(L - 1)])
    scales = [n.scale(f(got[key])) for i in range(L) for (_, _, n), key in zip(w.layer_norms[i], norm_keys[i])]
    scale = w.final.scale(resid_final)
    state = CleanState(
        calls=calls,
        resid_pre=torch.stack([f(x.detach()) for x in inputs]),
        z=z_hf - w.c[:, None, None],
        o_out=o_out,
        attn_post_scale=torch.stack([w.attn_post[i].scale(o_out[i]) for i in range(L)]) if w.post_norm else None,
        mlp_write=torch.stack([f(got[H.mlp_out(i)]) for i in range(L)]),
        mlp_pre_final=f(got[H.mlp_module_out(L - 1)]) if H.mlp_module_out(L - 1) in got else None,
        post_final_raw=f(got[H.mlp_post(L - 1)]),
        resid_final=resid_final,
        scale=scale,
        norm_scales=torch.stack(scales + [scale], -1),
        logits=f(out.logits),
        raw_logits=f(got[H.UNEMBED_OUT]) * w.logit_scale,
        linears=linears if with_linears else None,
    )
    if state.mlp_pre_final is not None:
        state.mlp_post_scale = w.mlp_post[-1].scale(state.mlp_pre_final)[..., None]
    return state


def _norm_roles(w: Weights, layer: int) -> list[str]:
    """The TransformerLens roles (`ln1`, `ln2`, `ln1_post`, …) of a layer's norms, in `w.layer_norms` order."""
    children = [name.rsplit(".", 1)[-1] for name, _, _ in w.layer_norms[layer]]
    return H.norm_roles(children, w.family.attn_post, w.family.mlp_post)


def head_projections(w: Weights, u: Float[Tensor, "batch pos d_model"]) -> Tensor:
    """`W_O_eff[l, h] @ u` for every head: [layer, batch, pos, head, d_head].

    A head's DE is then one dot product with its z per token (divided by its post-norm
    scale where there is one); shared by every patched pass of the batch.
    """
    return torch.einsum("lhdm,bpm->lbphd", w.W_O_eff, u)


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


def patch_layer(
    w: Weights,
    clean: CleanState,
    layer: int,
    heads: list[int],
    z_new: Float[Tensor, "k batch pos d_head"],
    u: Float[Tensor, "batch pos d_model"],
    ou: Float[Tensor, "layer batch pos head d_head"],
    dtype: torch.dtype | None = None,
) -> PatchResult:
    """Ablate each of `heads` (all in `layer`) by replacing its processed z with `z_new[i]`.

    One pass runs layers `layer`… on `k + 1` copies of the batch (copy 0 unpatched, the
    baseline; copy j + 1 ablates heads[j]); each quantity is its clean value plus
    (copy − baseline). The steps, in order: `_patch_hooks` (what the pass captures and
    replaces), `_head_changes` and `_mlp_change` per layer, `_own_de` at the ablated layer,
    `_final_state` after the last layer.

    Args:
        w: the model's modules and processed weights.
        clean: the batch's clean run from `clean_run`.
        layer: the layer of every ablated head.
        heads: head indices, one copy of the batch each, plus an unpatched baseline copy.
        z_new: the replacement processed z for each head.
        u: the correct next token's processed unembedding column at every position.
        ou: `head_projections(w, u)`.
        dtype: run the layers' matrix products in this dtype, on the change from the clean
            run (`_DeltaInDtype`), or None (float32).

    Returns:
        Per-head results; positions without a next token carry garbage the caller drops.
    """
    k, n = len(heads), len(heads) + 1
    batch, pos = u.shape[:2]
    got: dict = {}  # TransformerLens hook name -> [copy, batch, pos, …] of this pass
    d_heads = u.new_zeros((k, batch, pos, w.n_layers, w.n_heads))
    d_mlps = u.new_zeros((k, batch, pos, w.n_layers))
    de_head = None
    hidden = clean.resid_pre[layer].repeat(n, 1, 1)  # [n·batch, pos, d_model], copy-major
    with torch.no_grad(), hooks(*_patch_hooks(w, clean, layer, heads, z_new, got, n, dtype)):
        for i in range(layer, w.n_layers):
            hidden = clean.calls[i].run(w.layers[i], hidden, batch, n)
            d_heads[..., i, :], sp = _head_changes(w, clean, i, got, ou, clean.scale)
            if i == layer:
                de_head = _own_de(clean, layer, heads, z_new, ou, sp)
                d_heads[torch.arange(k, device=u.device), :, :, layer, torch.tensor(heads, device=u.device)] = 0
            d_mlps[..., i] = _mlp_change(got.pop(H.mlp_out(i)), u, clean.scale)
    logit, s_abl, post = _final_state(w, clean, hidden.float().view(n, batch, pos, -1), got, u)
    return PatchResult(logit=logit, scale=s_abl, de_head=de_head, d_de_heads=d_heads, d_de_mlps=d_mlps,
                       post_final=post)


def _patch_hooks(w: Weights, clean: CleanState, layer: int, heads: list[int], z_new: Tensor, got: dict, n: int,
                 dtype: torch.dtype | None) -> list:
    """The pass's hook registrations: replace the ablated heads' z at `layer`, capture every later
    layer's z, attention output and MLP write, the final MLP's activations, and (with `dtype`) run
    each projection on the change from the clean run."""
    batch, pos = clean.scale.shape
    n_heads, dh = w.n_heads, w.d_head
    last = w.n_layers - 1

    def z_hook(i):
        def hook(module, args):
            x = args[0]
            if i == layer:  # copy 0 is the baseline; copy j + 1 ablates heads[j]
                # Every copy gets the exact float32 clean z of this layer, so the ablated
                # head's change is exactly z_new − z_clean whatever the sweep's precision.
                view = (clean.z[layer] + w.c[layer]).repeat(n, 1, 1, 1).view(n, batch, pos, n_heads, dh)
                x = view.reshape(x.shape)
                for j, h in enumerate(heads):
                    view[j + 1, :, :, h] = z_new[j] + w.c[layer, h]
            got[H.z(i)] = x.detach().float().clone().view(n, batch, pos, n_heads, dh)
            return (x, *args[1:]) if i == layer else None
        return hook

    put = lambda key: (lambda m, a, o=None: got.__setitem__(  # noqa: E731
        key, (a[0] if o is None else o).detach().float().clone().view(n, batch, pos, -1)))
    regs = []
    for i in range(layer, w.n_layers):
        regs.append(lambda i=i: w.attn_out[i].register_forward_pre_hook(z_hook(i)))
        regs.append(lambda i=i: w.mlp_write[i].register_forward_hook(put(H.mlp_out(i))))
        if w.post_norm:
            regs.append(lambda i=i: w.attn_out[i].register_forward_hook(put(H.attn_out(i))))
    if clean.mlp_pre_final is not None:
        regs.append(lambda: w.mlp_out[-1].register_forward_hook(put(H.mlp_module_out(last))))
    regs.append(lambda: w.down_final.register_forward_pre_hook(put(H.mlp_post(last))))
    if dtype is not None:
        cache = w.__dict__.setdefault("_low_weights", {})
        regs += [lambda m=m: _DeltaInDtype(m, *clean.linears[m], n, dtype, cache)
                 for i in range(layer, w.n_layers) for m in _linears(w, i)]
    return regs


def _head_changes(w: Weights, clean: CleanState, i: int, got: dict, ou: Tensor, s: Tensor
                  ) -> tuple[Tensor, Tensor | None]:
    """ΔDE of every head of layer `i` in each ablated copy, [k, batch, pos, head]; with post-norm
    blocks also the ablated attention post-norm scale (None without)."""
    z = got.pop(H.z(i))
    s_h = s[..., None]
    if not w.post_norm:
        return ((z[1:] - z[0]) * ou[i]).sum(-1) / s_h, None
    o = got.pop(H.attn_out(i))
    sp = w.attn_post[i].scale(clean.o_out[i] + (o[1:] - o[0]))[..., None]  # ablated post-norm scale
    z_abl = clean.z[i] + (z[1:] - z[0])  # [k, batch, pos, head, d_head], processed
    return ((z_abl * ou[i]).sum(-1) / sp
            - (clean.z[i] * ou[i]).sum(-1) / clean.attn_post_scale[i][..., None]) / s_h, sp


def _own_de(clean: CleanState, layer: int, heads: list[int], z_new: Tensor, ou: Tensor, sp: Tensor | None
            ) -> Tensor:
    """Each ablated head's own DE after patching, [k, batch, pos]: from the replacement z itself, not a
    difference of two low-precision runs (its change is d_de, not part of d_de_heads)."""
    head_idx = torch.tensor(heads, device=z_new.device)
    ou_h = ou[layer][:, :, head_idx].permute(2, 0, 1, 3)  # [k, batch, pos, d_head]
    de_head = (z_new * ou_h).sum(-1) / clean.scale
    return de_head if sp is None else de_head / sp[..., 0]


def _mlp_change(m: Tensor, u: Tensor, s: Tensor) -> Tensor:
    """ΔDE of one MLP layer's write in each ablated copy, [k, batch, pos]."""
    return ((m[1:] - m[0]) * u).sum(-1) / s


def _final_state(w: Weights, clean: CleanState, r: Tensor, got: dict, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """From the last layer's output `r` ([copy, batch, pos, d_model]): each ablated copy's logit of the
    correct token (minus b_U), its final-norm scale and its final-MLP activations (post-norm scaled)."""
    last = w.n_layers - 1
    resid = clean.resid_final + (r[1:] - r[0])
    s_abl = w.final.scale(resid)
    p = got.pop(H.mlp_post(last))
    post = clean.post_final_raw + (p[1:] - p[0])
    if clean.mlp_pre_final is not None:
        mp = got.pop(H.mlp_module_out(last))
        post = post / w.mlp_post[-1].scale(clean.mlp_pre_final + (mp[1:] - mp[0]))[..., None]
    return (resid * u).sum(-1) / s_abl, s_abl, post
