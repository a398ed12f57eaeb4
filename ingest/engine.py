"""The fast ablation engine: the model's own decoder layers, driven from the cached residual.

The clean run is one float32 forward of the Hugging Face model with hooks that keep what
every later pass reuses: the residual entering each layer and the exact arguments each
layer was called with (masks, rotary tables, ALiBi), each head's z, each attention module's
output, each MLP's write.

A patched pass for units whose first layer is L (heads, head groups, whole attention
layers, MLPs, blocks: a `Patch` each) calls only layers L… on the cached residual
entering L, with every unit batched along the batch dimension, one copy of the batch each
and no baseline copy. Layer L's input is the baseline's in every copy, so it computes only
what the ablation changes: its attention module returns the stored output plus the units'
heads' change, Σ (z_new − z) @ W_O[h] (a post-norm after it is still the layer's own), and
its MLP does not run in a parallel block (its input is unchanged) nor where every copy
replaces its write. A last-layer unit so costs the final norm and the target column, plus
one MLP in a sequential block. Under a condition (`U | U0`) the baseline is the U0-ablated
run (`clean_run` with U0's `Patch`), and every copy keeps U0's replacements at its layers.
Every change is the copy's value minus the stored baseline value, in float32 (patching in the
baseline's own values changes nothing, to float32 rounding). In bfloat16 or float16 only
the matrix products run in low precision, and only on the change: each projection
returns its clean float32 output plus a low-precision product with (input − clean
input); norms, attention, activations, the residual stream and the attention output
projection stay float32, so the identities hold exactly as in float32. Nothing projects onto the
full vocabulary: DEs are dot products with the target token's processed column `u`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    def __init__(self, module, clean_x: Tensor, clean_y: Tensor, dtype: torch.dtype, cache: dict):
        from transformers.pytorch_utils import Conv1D

        self.module = module
        key = (id(module), dtype)
        if key not in cache:  # the module's weight in low precision, made once per model
            cache[key] = module.weight.detach().to(dtype)
        weight, conv = cache[key], isinstance(module, Conv1D)
        x0, y0 = clean_x, clean_y

        def forward(x):
            # [copies·batch, …] viewed copy-major against the clean batch: broadcasting, not tiling,
            # so any number of copies (or none of the clean tensors' copies) costs no extra memory.
            d = (x.float().view(-1, *x0.shape) - x0).to(dtype)
            y = (d @ weight if conv else torch.nn.functional.linear(d, weight)).float() + y0
            return y.view(*x.shape[:-1], y.shape[-1])

        module.forward = forward

    def remove(self) -> None:
        del self.module.forward  # the class's forward shows through again


@dataclass
class Patch:
    """What one ablated run replaces, at every position of the row (DESIGN.md, "Units").

    Args:
        heads: layer -> head -> the head's new processed z, [batch, pos, d_head].
        mlps: layer -> the MLP's new write to the residual (after any post-norm), [batch, pos, d_model].
    """

    heads: dict[int, dict[int, Tensor]] = field(default_factory=dict)
    mlps: dict[int, Tensor] = field(default_factory=dict)

    def from_layer(self, layer: int) -> Patch:
        """The replacements at `layer` and after: what a pass starting there must still make."""
        return Patch({l: v for l, v in self.heads.items() if l >= layer},
                     {l: v for l, v in self.mlps.items() if l >= layer})


def _set_z(w: Weights, x: Tensor, layer: int, sets: list[tuple[slice | int, dict[int, Tensor]]],
           n: int, batch: int, pos: int) -> Tensor:
    """`x` (the output projection's input, [n·batch, pos, head·d_head]) with heads' processed z set:
    each (copies, {head: z}) in `sets` writes z + c (the folded value bias) into those copies."""
    x = x.clone(memory_format=torch.contiguous_format)  # viewed per copy and head below
    view = x.view(n, batch, pos, w.n_heads, w.d_head)
    for copies, heads in sets:
        for h, z in heads.items():
            view[copies, :, :, h] = z + w.c[layer, h]
    return x


def _set_mlp(out: Tensor, sets: list[tuple[slice | int, Tensor]], n: int, batch: int, pos: int) -> Tensor:
    """A fresh copy of an MLP write (some layers add into it in place afterwards) with `sets` written in."""
    out = out.clone(memory_format=torch.contiguous_format)  # viewed per copy below
    view = out.view(n, batch, pos, -1)
    for copies, value in sets:
        view[copies] = value
    return out


def _replacing(out, new: Tensor):
    """A module's output with its first tensor replaced (modules may return tuples)."""
    return (new, *out[1:]) if isinstance(out, tuple) else new


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
    # Per layer, the attention module's output as the layer received it (`attn_module`): its first
    # tensor (float32, the module's own shape) and the rest of its tuple (None for a bare tensor).
    # A pass's first layer returns it plus the heads' change instead of recomputing attention.
    attn_module_out: list[Tensor] | None = None
    attn_module_rest: list[tuple | None] | None = None

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


def clean_run(w: Weights, rows: Tensor, with_linears: bool = False, replace: Patch | None = None,
              logits: bool = True) -> CleanState:
    """One float32 forward of the batch with everything later passes and the clean tables need.

    `with_linears` also keeps every projection's input and output, the baseline of a
    low-precision sweep. `replace` makes it the run of that ablation instead (a condition's
    baseline): its heads' z and MLP writes are replaced as the forward goes, and every
    capture sees the replaced values. Without `logits` the unembedding does not run (`logits`
    and `raw_logits` are then empty, [batch, pos, 0]): a resample source batch is read only for
    its replacement values.
    """
    L = w.n_layers
    batch, pos = rows.shape
    replace = replace or Patch()
    got: dict = {}  # TransformerLens hook name -> the tensor that hook sees (ingest/hook_names.py)
    # Copies: some layers add into a module's output in place afterwards (Falcon's MLP).
    put = lambda key: (lambda m, a, o=None: got.__setitem__(key, (a[0] if o is None else o).detach().clone()))  # noqa: E731

    def z_hook(i):
        def hook(module, args):
            x = args[0]
            if i in replace.heads:
                x = _set_z(w, x, i, [(0, replace.heads[i])], 1, batch, pos)
            got[H.z(i)] = x.detach().clone()
            return (x, *args[1:]) if i in replace.heads else None
        return hook

    def mlp_hook(i):
        def hook(module, args, out):
            o = out[0] if isinstance(out, tuple) else out
            if i in replace.mlps:
                o = _set_mlp(o, [(0, replace.mlps[i])], 1, batch, pos)
            got[H.mlp_out(i)] = o.detach().clone()
            return _replacing(out, o) if i in replace.mlps else None
        return hook

    attn_first: list[Tensor | None] = [None] * L
    attn_rest: list[tuple | None] = [None] * L

    def attn_hook(i):
        def hook(module, args, out):
            first = out[0] if isinstance(out, tuple) else out
            attn_first[i] = first.detach().float().clone()
            attn_rest[i] = tuple(out[1:]) if isinstance(out, tuple) else None
        return hook

    norm_keys = [[H.norm_in(i, role) for role in _norm_roles(w, i)] for i in range(L)]
    regs = []
    for i in range(L):
        regs.append(lambda i=i: attn_module(w, i).register_forward_hook(attn_hook(i)))
        regs.append(lambda i=i: w.attn_out[i].register_forward_pre_hook(z_hook(i)))
        regs.append(lambda i=i: w.mlp_write[i].register_forward_hook(mlp_hook(i)))
        if w.post_norm:
            regs.append(lambda i=i: w.attn_out[i].register_forward_hook(put(H.attn_out(i))))
        for (_, module, _), key in zip(w.layer_norms[i], norm_keys[i]):
            regs.append(lambda module=module, key=key: module.register_forward_pre_hook(put(key)))
    if w.mlp_post[-1] is not None:
        regs.append(lambda: w.mlp_out[-1].register_forward_hook(put(H.mlp_module_out(L - 1))))
    if w.down_final is not None:  # a mixture of experts has no final-MLP neurons
        regs.append(lambda: w.down_final.register_forward_pre_hook(put(H.mlp_post(L - 1))))
    regs.append(lambda: module_at(w.model, w.family.final_norm).register_forward_pre_hook(put(H.resid_post(L - 1))))
    regs.append(lambda: w.model.get_output_embeddings().register_forward_hook(put(H.UNEMBED_OUT)))
    if not logits:  # the full-vocabulary product is the costliest single step of a small model's forward
        lm_head = w.model.get_output_embeddings()
        regs.append(lambda: ForwardOverride(lm_head, lambda x: x.new_zeros((*x.shape[:-1], 0))))
    linears = {}
    if with_linears:
        keep = lambda m, a, o: linears.__setitem__(m, (a[0].detach().float().clone(), o.detach().float().clone()))  # noqa: E731
        regs += [lambda m=m: m.register_forward_hook(keep) for i in range(L) for m in _linears(w, i)]
    calls, inputs, out = capture_calls(w.model, w.layers, rows, regs)
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
        post_final_raw=f(got[H.mlp_post(L - 1)]) if w.down_final is not None else resid_final[..., :0],
        resid_final=resid_final,
        scale=scale,
        norm_scales=torch.stack(scales + [scale], -1),
        logits=out.logits.float().reshape(batch, pos, out.logits.shape[-1]),
        raw_logits=got[H.UNEMBED_OUT].float().reshape(batch, pos, out.logits.shape[-1]) * w.logit_scale,
        linears=linears if with_linears else None,
        attn_module_out=attn_first,
        attn_module_rest=attn_rest,
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
    # Contiguous: einsum returns a permuted view, and every pass multiplies each layer's slice of it
    # into [copy, batch, pos, head, d_head] (a strided operand made that product several times slower).
    return torch.einsum("lhdm,bpm->lbphd", w.W_O_eff, u).contiguous()


@dataclass
class PatchResult:
    """What one patched pass yields for each ablated unit (leading dim `k` = unit in the pass).

    Every DE uses the baseline's final-norm scale (the clean run's, or the condition-ablated
    run's), as DESIGN.md asks.
    """

    logit: Float[Tensor, "k batch pos"]  # ablated centred logit of the correct token, minus b_U
    scale: Float[Tensor, "k batch pos"]  # ablated final-norm scale
    de: Float[Tensor, "k batch pos"]  # the unit's own DE after patching (sum over its components)
    d_de_heads: Float[Tensor, "k batch pos layer head"]  # ΔDE of every head outside the unit (0 where unchanged)
    d_de_mlps: Float[Tensor, "k batch pos layer"]  # ΔDE of every MLP layer outside the unit
    post_final: Float[Tensor, "k batch pos d_mlp"]  # ablated final-MLP activations
    # Output metrics against the baseline's distribution (ingest/output_metrics.py), [k, batch, pos]; None when off.
    d_loss: Tensor | None = None
    kl: Tensor | None = None
    d_entropy: Tensor | None = None
    top1_changed: Tensor | None = None  # bool

    @property
    def de_head(self) -> Tensor:
        """The name of `de` when every unit was one head (the self-check reads it)."""
        return self.de


def head_patches(layer: int, heads: list[int], z_new: Float[Tensor, "k batch pos d_head"]) -> list[Patch]:
    """One `Patch` per head of `layer`: head heads[j] gets z_new[j]."""
    return [Patch({layer: {h: z_new[j]}}) for j, h in enumerate(heads)]


def attn_module(w: Weights, layer: int):
    """The decoder layer's attention module: its child that holds the attention output projection."""
    return module_at(w.layers[layer], w.family.attn_out.split(".", 1)[0])


def _whole_mlp(w: Weights, layer: int):
    """The layer's MLP module when that one module computes the whole MLP (it holds the down
    projection), else None (OPT and BLOOM call their MLP's pieces from the layer; a mixture of
    experts may return a tuple with its router's logits)."""
    f = w.family
    if f.moe or not f.down.startswith(f.mlp_out + "."):
        return None
    return w.mlp_out[layer]


class ForwardOverride:
    """Replace a module's forward with `forward` until `remove()`; its hooks still run around it."""

    def __init__(self, module, forward):
        self.module = module
        module.forward = forward

    def remove(self) -> None:
        del self.module.forward  # the class's forward shows through again


def _first_layer_change(w: Weights, clean: CleanState, layer: int, patches: list[Patch]
                        ) -> Float[Tensor, "k batch pos d_model"]:
    """Each unit's change to the attention output of the pass's first layer: Σ over its heads there of
    (z_new − z) @ W_O[h]. That layer's input is the baseline's in every copy, so its attention output
    is exactly the baseline's plus this (the projection is linear; the value bias cancels)."""
    batch, pos = clean.scale.shape
    delta = clean.scale.new_zeros((len(patches), batch, pos, w.d_model))
    for j, p in enumerate(patches):
        heads = list(p.heads.get(layer, {}))
        if heads:
            dz = torch.stack([p.heads[layer][h] - clean.z[layer][:, :, h] for h in heads], -2)  # [batch, pos, h, d_head]
            delta[j] = dz.flatten(-2) @ w.W_O[layer, heads].flatten(0, 1)
    return delta


def patch_layer(
    w: Weights,
    clean: CleanState,
    layer: int,
    patches: list[Patch],
    u: Float[Tensor, "batch pos d_model"],
    ou: Float[Tensor, "layer batch pos head d_head"],
    dtype: torch.dtype | None = None,
    base: Patch | None = None,
    output=None,
) -> PatchResult:
    """Ablate each unit of `patches` (none replacing anything before `layer`) in one pass from `layer`.

    One pass runs layers `layer`… on `k` copies of the batch (copy j makes patches[j]'s
    replacements, each at its own layer); each quantity's change is the copy's value minus the
    baseline's stored one. With `base` (a condition's replacements; `clean` is then its ablated
    run) every copy also makes base's replacements at `layer` and after. The first layer computes
    only what the ablation changes (`_first_layer_hooks`): its attention output is the baseline's
    plus the units' heads' change, and its MLP runs only where its input or write can differ.
    The steps, in order: `_patch_hooks` (what the pass captures and replaces), `_head_changes`
    (`_first_head_changes` at the first layer) and `_mlp_change` per layer with `_own_heads` and
    `_own_mlps` taking the units' own components out, `_final_state` after the last layer.

    Args:
        w: the model's modules and processed weights.
        clean: the batch's baseline run from `clean_run` (with `base`'s replacements, if any).
        layer: the first layer the pass runs (no patch replaces anything before it).
        patches: what each unit replaces, one copy of the batch each.
        u: the correct next token's processed unembedding column at every position.
        ou: `head_projections(w, u)`.
        dtype: run the layers' matrix products in this dtype, on the change from the baseline
            run (`_DeltaInDtype`), or None (float32).
        base: the condition's replacements (layers before `layer` are already in `clean`).
        output: the baseline's output distribution (`output_metrics.Baseline` of `clean`), or None: no
            output metrics.

    Returns:
        Per-unit results; positions without a next token carry garbage the caller drops.
    """
    k = len(patches)
    if any(l < layer for p in patches for l in (*p.heads, *p.mlps)):
        raise ValueError(f"a patch replaces a component before the pass's first layer {layer}")
    base = (base or Patch()).from_layer(layer)
    batch, pos = u.shape[:2]
    got: dict = {}  # TransformerLens hook name -> [copy, batch, pos, …] of this pass
    d_heads = u.new_zeros((k, batch, pos, w.n_layers, w.n_heads))
    d_mlps = u.new_zeros((k, batch, pos, w.n_layers))
    de = u.new_zeros((k, batch, pos))
    delta = _first_layer_change(w, clean, layer, patches)
    hidden = clean.resid_pre[layer].repeat(k, 1, 1)  # [k·batch, pos, d_model], copy-major
    with torch.no_grad(), hooks(*_patch_hooks(w, clean, layer, patches, base, got, k, dtype, u),
                                *_first_layer_hooks(w, clean, layer, patches, base, delta)):
        tiled: dict = {}  # the layers' batch-shaped arguments, tiled once for the pass
        for i in range(layer, w.n_layers):
            hidden = clean.calls[i].run(w.layers[i], hidden, batch, k, tiled)
            if i == layer:
                d_heads[..., i, :], sp = _first_head_changes(w, clean, i, delta, ou, clean.scale)
            else:
                d_heads[..., i, :], sp = _head_changes(w, clean, i, got, ou, clean.scale)
            de += _own_heads(patches, i, d_heads, ou, clean.scale, sp)
            d_mlps[..., i] = got.pop(H.mlp_out(i))  # ΔDE, made in the hook (`_patch_hooks`)
            de += _own_mlps(patches, i, d_mlps, u, clean.scale)
    r = hidden.float().view(k, batch, pos, -1)  # each copy's ablated residual (no baseline copy)
    logit, s_abl, post = _final_state(w, clean, r, got, u)
    metrics = output.ablated(r) if output is not None else {}
    return PatchResult(logit=logit, scale=s_abl, de=de, d_de_heads=d_heads, d_de_mlps=d_mlps, post_final=post,
                       **metrics)


def _first_layer_hooks(w: Weights, clean: CleanState, layer: int, patches: list[Patch], base: Patch,
                       delta: Tensor) -> list:
    """The first layer's shortcuts (exact: its input is the baseline's in every copy).

    Its attention module returns the baseline's output plus `delta` (the units' heads' change)
    without running. Its MLP (when one module computes it) does not run where no copy needs it:
    in a parallel block its input is the baseline's (it returns the baseline's write), and where
    every copy replaces its write (MLP and block units) anything it returns is replaced anyway.
    """
    k = len(patches)
    out, rest = clean.attn_module_out[layer], clean.attn_module_rest[layer]

    def attn_forward(*args, **kwargs):
        # [k·batch, …] in the module's own layout ([batch, pos, d_model], or flattened tokens)
        first = (out.unsqueeze(0) + delta.view(k, *out.shape)).view(k * out.shape[0], *out.shape[1:])
        return first if rest is None else (first, *rest)

    regs = [lambda: ForwardOverride(attn_module(w, layer), attn_forward)]
    mlp = _whole_mlp(w, layer)
    replaced = all(layer in p.mlps for p in patches) or layer in base.mlps
    unchanged = w.parallel and w.mlp_post[layer] is None
    if mlp is not None and (replaced or unchanged):
        write = clean.mlp_write[layer]  # [batch, pos, d_model]: the MLP module's output without a post-norm

        def mlp_forward(x, *args, **kwargs):
            # A fresh tensor: some layers add into the MLP's output in place (Falcon).
            value = write if unchanged else torch.zeros_like(write)
            return value.repeat(k, 1, 1).view(*x.shape[:-1], w.d_model).to(x.dtype)

        regs.append(lambda: ForwardOverride(mlp, mlp_forward))
    return regs


def _patch_hooks(w: Weights, clean: CleanState, layer: int, patches: list[Patch], base: Patch, got: dict, n: int,
                 dtype: torch.dtype | None, u: Tensor) -> list:
    """The pass's hook registrations: replace the units' (and the condition's) heads' z and MLP writes,
    capture every layer's z and attention output after `layer`, every MLP write's ΔDE (target columns
    `u`) from `layer` on, the final MLP's activations, and (with `dtype`) run each projection on the
    change from the baseline run."""
    batch, pos = clean.scale.shape
    n_heads, dh = w.n_heads, w.d_head
    last = w.n_layers - 1
    every = slice(None)  # the condition's replacements go into every copy
    z_sets = {i: [(every, base.heads[i])] if i in base.heads else [] for i in range(layer, w.n_layers)}
    mlp_sets = {i: [(every, base.mlps[i])] if i in base.mlps else [] for i in range(layer, w.n_layers)}
    for j, p in enumerate(patches):  # copy j makes patches[j]'s replacements
        for i, heads in p.heads.items():
            z_sets[i].append((j, heads))
        for i, value in p.mlps.items():
            mlp_sets[i].append((j, value))

    def z_hook(i):
        def hook(module, args):
            x = args[0]
            if z_sets[i]:
                x = _set_z(w, x, i, z_sets[i], n, batch, pos)
            # No copy: the projection only reads it, and the pass reads it before the next layer.
            got[H.z(i)] = x.detach().float().view(n, batch, pos, n_heads, dh)
            return (x, *args[1:]) if z_sets[i] else None
        return hook

    def mlp_hook(i):
        def hook(module, args, out):
            o = out[0] if isinstance(out, tuple) else out
            if mlp_sets[i]:
                o = _set_mlp(o, mlp_sets[i], n, batch, pos)
            # The write's ΔDE right away (the layer may add into it in place afterwards, as Falcon does),
            # so the write itself is never copied; a non-contiguous one is, to be viewed per copy.
            m = o.detach().float()
            m = m if m.is_contiguous() else m.clone()
            got[H.mlp_out(i)] = _mlp_change(m.view(n, batch, pos, -1), clean.mlp_write[i], u, clean.scale)
            return _replacing(out, o) if mlp_sets[i] else None
        return hook

    put = lambda key: (lambda m, a, o=None: got.__setitem__(  # noqa: E731
        key, (a[0] if o is None else o).detach().float().clone().view(n, batch, pos, -1)))
    regs = []
    for i in range(layer, w.n_layers):
        if i > layer:  # the first layer's attention does not run (`_first_layer_hooks`)
            regs.append(lambda i=i: w.attn_out[i].register_forward_pre_hook(z_hook(i)))
            if w.post_norm:
                regs.append(lambda i=i: w.attn_out[i].register_forward_hook(put(H.attn_out(i))))
        regs.append(lambda i=i: w.mlp_write[i].register_forward_hook(mlp_hook(i)))
    if clean.mlp_pre_final is not None:
        regs.append(lambda: w.mlp_out[-1].register_forward_hook(put(H.mlp_module_out(last))))
    if w.down_final is not None:
        regs.append(lambda: w.down_final.register_forward_pre_hook(put(H.mlp_post(last))))
    if dtype is not None:
        cache = w.__dict__.setdefault("_low_weights", {})
        regs += [lambda m=m: _DeltaInDtype(m, *clean.linears[m], dtype, cache)
                 for i in range(layer, w.n_layers) for m in _linears(w, i)]
    return regs


def _first_head_changes(w: Weights, clean: CleanState, i: int, delta: Tensor, ou: Tensor, s: Tensor
                        ) -> tuple[Tensor, Tensor | None]:
    """As `_head_changes` at the pass's first layer, whose heads keep their baseline z (the units' own
    heads are taken out by `_own_heads`): no change without post-norms; with them, every head's DE
    moves with the attention post-norm's scale, of the baseline output plus `delta`."""
    k = delta.shape[0]
    if not w.post_norm:
        return ou.new_zeros((k, *s.shape, w.n_heads)), None
    sp = w.attn_post[i].scale(clean.o_out[i] + delta)[..., None]  # ablated post-norm scale
    de = (clean.z[i] * ou[i]).sum(-1)  # [batch, pos, head], before either scale
    return (de / sp - de / clean.attn_post_scale[i][..., None]) / s[..., None], sp


def _head_changes(w: Weights, clean: CleanState, i: int, got: dict, ou: Tensor, s: Tensor
                  ) -> tuple[Tensor, Tensor | None]:
    """ΔDE of every head of layer `i` in each ablated copy, [k, batch, pos, head]; with post-norm
    blocks also the ablated attention post-norm scale (None without)."""
    z = got.pop(H.z(i)) - w.c[i]  # [k, batch, pos, head, d_head], processed (a fresh tensor)
    s_h = s[..., None]
    if not w.post_norm:  # in place: the same values as ((z − z_clean) · ou), without two more tensors
        return z.sub_(clean.z[i]).mul_(ou[i]).sum(-1) / s_h, None
    sp = w.attn_post[i].scale(got.pop(H.attn_out(i)))[..., None]  # ablated post-norm scale
    return ((z * ou[i]).sum(-1) / sp
            - (clean.z[i] * ou[i]).sum(-1) / clean.attn_post_scale[i][..., None]) / s_h, sp


def _own_heads(patches: list[Patch], i: int, d_heads: Tensor, ou: Tensor, s: Tensor, sp: Tensor | None) -> Tensor:
    """The units' own heads of layer `i`: their DE after patching, summed per unit ([k, batch, pos]),
    from the replacement z itself, not a difference of two low-precision runs; their change is the
    unit's d_de, so it is taken out of `d_heads` (in place)."""
    out = d_heads.new_zeros(d_heads.shape[:3])
    for j, p in enumerate(patches):
        for h, z in p.heads.get(i, {}).items():
            de = (z * ou[i][:, :, h]).sum(-1) / s
            out[j] += de if sp is None else de / sp[j, ..., 0]
            d_heads[j, :, :, i, h] = 0
    return out


def _own_mlps(patches: list[Patch], i: int, d_mlps: Tensor, u: Tensor, s: Tensor) -> Tensor:
    """The units' own MLP of layer `i`: its DE after patching (the replacement write's), [k, batch, pos];
    its change is the unit's d_de, so it is taken out of `d_mlps` (in place)."""
    out = d_mlps.new_zeros(d_mlps.shape[:3])
    for j, p in enumerate(patches):
        if i in p.mlps:
            out[j] += (p.mlps[i] * u).sum(-1) / s
            d_mlps[j, :, :, i] = 0
    return out


def _mlp_change(m: Tensor, clean_m: Tensor, u: Tensor, s: Tensor) -> Tensor:
    """ΔDE of one MLP layer's write `m` ([k, batch, pos, d_model]) against the baseline's, [k, batch, pos]."""
    return (m - clean_m).mul_(u).sum(-1) / s  # in place on the fresh difference (the same values)


def _final_state(w: Weights, clean: CleanState, r: Tensor, got: dict, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """From the last layer's output `r` ([copy, batch, pos, d_model]): each ablated copy's logit of the
    correct token (minus b_U), its final-norm scale and its final-MLP activations (post-norm scaled)."""
    last = w.n_layers - 1
    s_abl = w.final.scale(r)
    logit = (r * u).sum(-1) / s_abl
    p = got.pop(H.mlp_post(last), None)
    if w.down_final is None:  # a mixture of experts: no final-MLP neurons (d_mlp 0)
        return logit, s_abl, r.new_zeros((*s_abl.shape, 0))
    if p is None:  # the last MLP did not run (`_first_layer_hooks`): the baseline's activations
        got.pop(H.mlp_module_out(last), None)
        return logit, s_abl, clean.post_final.expand(r.shape[0], *clean.post_final.shape)
    post = p
    if clean.mlp_pre_final is not None:
        post = post / w.mlp_post[-1].scale(got.pop(H.mlp_module_out(last)))[..., None]
    return logit, s_abl, post


def component_des(clean: CleanState, u: Float[Tensor, "batch pos d_model"], ou: Tensor
                  ) -> tuple[Float[Tensor, "batch pos layer head"], Float[Tensor, "batch pos layer"]]:
    """Every head's and every MLP's DE in the run `clean` (the clean or a condition-ablated run), at
    that run's own final-norm scale: what the heads and MLPs of a unit sum to in the baseline."""
    de_h = (clean.z * ou).sum(-1)  # [layer, batch, pos, head]
    if clean.attn_post_scale is not None:
        de_h = de_h / clean.attn_post_scale[..., None]
    de_h = de_h.permute(1, 2, 0, 3) / clean.scale[..., None, None]
    de_m = torch.einsum("lbpm,bpm->bpl", clean.mlp_write, u) / clean.scale[..., None]
    return de_h, de_m
