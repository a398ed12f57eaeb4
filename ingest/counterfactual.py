"""Measured mechanisms: each ablation re-run with frozen norms or frozen attention (DESIGN.md, "Beyond single heads").

*frozen-norms*: every residual-stream norm the pass runs (each layer's norms from the unit's first
layer on, and the final norm) divides by its scale in the baseline run instead of its own, and so
does every query/key norm inside attention where the family has them (`ingest/qk_norms.py`).
*frozen-attention*: every attention pattern the pass runs is the baseline run's; queries and keys
are ignored, values recomputed. The baseline is the clean run, or under a condition the
condition-ablated run, as everywhere else.

A re-run happens only on each unit's top-p% tokens. Attention is causal, so a unit needs only the
rows holding one of its top tokens, and positions up to the last of them there. Units of one first
layer share passes (`counterfactual_rules.pass_groups`), each on its own rows: a pass holds, unit by
unit, those rows (a row once per unit needing it), and `counterfactual_rules.cuts_for` splits the
(unit, row) pairs into passes by their last position. The cached baseline (`engine.CleanState` from
the units' layer on, each layer's recorded `Call`, `u`) is cut to the pass's rows and positions
(`cut_state`), the replacements too (`shared_patch`: each unit's own on its rows, the baseline's
elsewhere), and `engine.patch_layer` runs on the cut, with the freezing hooks of this module
registered around it. Nothing in the engine changes.

Frozen attention goes through transformers' `AttentionInterface`: the baseline patterns are
recorded layer by layer, each layer run alone on its stored input under eager attention (which
returns its probabilities; `clean_patterns`), and the frozen pass swaps the model's attention
function for one that multiplies the recorded probabilities into the recomputed values. A family
whose attention does not go through that interface is refused before the model loads (`counterfactual_problem`), and a layer whose
attention skips the swapped function refuses the run.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import Tensor

from selfrepair.errors import ConfigError, UnsupportedModel
from selfrepair.ingest import engine as E
from selfrepair.ingest.counterfactual_rules import FROZEN_ATTENTION, FROZEN_NORMS, Cut, batch_groups, cuts_for
from selfrepair.ingest.families import attention_modules
from selfrepair.ingest.layer_calls import Call, Stop, capture_calls, hooks
from selfrepair.ingest.qk_norms import QKScales, frozen_qk_hooks, record_qk_scales

# -- cutting the baseline to the rows and positions -------------------------------------------
_LAYER_FIRST = ("resid_pre", "z", "o_out", "attn_post_scale", "mlp_write")  # [layer, batch, pos, …]


def _cut_tensor(t: Tensor, rows: Tensor, n_pos: int, batch: int, pos: int) -> Tensor:
    """A batch-major tensor of a layer call (mask, rotary table, position ids, ALiBi) cut to `rows`, `n_pos`.

    The batch dim is the first when its size is the batch (or a multiple: ALiBi's [batch·head, …]); a dim
    of size `pos` after it is cut to `n_pos`, except the last dim of a [*, pos, dim] table (rotary features).
    """
    if t.dim() == 0:
        return t
    if t.dim() == 1:
        return t[:n_pos] if t.shape[0] == pos else t
    if t.shape[0] == batch or (t.shape[0] % batch == 0 and t.shape[0] > batch):
        per = t.shape[0] // batch
        t = t.reshape(batch, per, *t.shape[1:])[rows].reshape(len(rows) * per, *t.shape[1:])
    index = [slice(None)] * t.dim()
    for d in range(1, t.dim()):
        feature = d == t.dim() - 1 and d >= 2 and t.shape[d - 1] == pos and t.dim() == 3
        if t.shape[d] == pos and not feature:
            index[d] = slice(0, n_pos)
    return t[tuple(index)]


def _cut_tokens(t: Tensor, rows: Tensor, n_pos: int, batch: int, pos: int) -> Tensor:
    """A module output laid out [batch, pos, d] or as flattened tokens [batch·pos, d], cut alike."""
    cut = t.reshape(batch, pos, t.shape[-1])[rows, :n_pos]
    return cut.reshape(-1, t.shape[-1]) if t.dim() == 2 else cut


def _cut_obj(obj, rows: Tensor, n_pos: int, batch: int, pos: int):
    if isinstance(obj, Tensor):
        return _cut_tensor(obj, rows, n_pos, batch, pos)
    if isinstance(obj, tuple):
        return tuple(_cut_obj(o, rows, n_pos, batch, pos) for o in obj)
    if isinstance(obj, list):
        return [_cut_obj(o, rows, n_pos, batch, pos) for o in obj]
    if isinstance(obj, dict):
        return {k: _cut_obj(v, rows, n_pos, batch, pos) for k, v in obj.items()}
    return obj


def cut_call(call: Call, rows: Tensor, n_pos: int, batch: int, pos: int) -> Call:
    """A layer's recorded call with its masks, rotary tables and position ids cut to `rows` and `n_pos`."""
    return Call(_cut_obj(call.args, rows, n_pos, batch, pos), _cut_obj(call.kwargs, rows, n_pos, batch, pos),
                call.hidden_kw)


def cut_state(clean: E.CleanState, cut: Cut, layer: int) -> E.CleanState:
    """The baseline run of the cut's rows and positions only, as a pass from `layer` reads it (float32; no
    low-precision baseline).

    A pass reads its layers' entries of the per-layer fields (`patch_layer` indexes them by layer), so
    those are lists with None before `layer` (the attention module's output: but at `layer`), and the
    output logits none (no output metrics here): a pass per unit would otherwise copy, each time, the
    whole depth and [rows, pos, vocab] twice.
    """
    batch, pos = clean.scale.shape
    rows = torch.as_tensor(cut.rows, device=clean.scale.device)
    p = cut.n_pos
    before, after = [None] * layer, [None] * (len(clean.calls) - layer - 1)
    out = {}
    for f in fields(clean):
        v = getattr(clean, f.name)
        if f.name == "calls":
            out[f.name] = before + [cut_call(c, rows, p, batch, pos) for c in v[layer:]]
        elif f.name in ("linears", "logits", "raw_logits"):
            out[f.name] = None
        elif f.name == "attn_module_out" and v is not None:  # [batch, pos, …] or flattened tokens; the first
            t = v[layer]  # layer's only: the pass's later layers run their attention
            out[f.name] = before + [None if t is None else _cut_tokens(t, rows, p, batch, pos)] + after
        elif f.name == "attn_module_rest" and v is not None:
            out[f.name] = before + [_cut_obj(v[layer], rows, p, batch, pos)] + after
        elif not isinstance(v, Tensor):
            out[f.name] = v
        elif f.name == "resid_pre":  # a pass starts from its first layer's input and reads no later one
            out[f.name] = before + [v[layer, rows, :p]] + after
        elif f.name in _LAYER_FIRST:
            out[f.name] = before + list(v[layer:, rows, :p].unbind(0))
        else:
            out[f.name] = v[rows, :p]
    return replace(clean, **out)


def cut_patch(patch: E.Patch, cut: Cut) -> E.Patch:
    """A unit's (or condition's) replacements at the cut's rows and positions."""
    rows = lambda t: t[torch.as_tensor(cut.rows, device=t.device), :cut.n_pos]  # noqa: E731
    return E.Patch({l: {h: rows(z) for h, z in hs.items()} for l, hs in patch.heads.items()},
                   {l: rows(v) for l, v in patch.mlps.items()})


# -- the freezing hooks ----------------------------------------------------------------------
def _norm_index(w) -> list[list[int]]:
    """Each layer norm's column in `CleanState.norm_scales` (layers' norms in order, then the final norm)."""
    out, j = [], 0
    for norms in w.layer_norms:
        out.append(list(range(j, j + len(norms))))
        j += len(norms)
    return out


def frozen_norm_hooks(w, state: E.CleanState, layer: int) -> list:
    """Registrations making every norm of layers `layer`… divide by its scale in `state` (cut to the pass's
    rows and positions, one copy): each norm's forward is replaced, so its own scale is never computed."""
    cols = _norm_index(w)
    regs = []
    for i in range(layer, w.n_layers):
        for (_, module, norm), j in zip(w.layer_norms[i], cols[i]):
            s = state.norm_scales[..., j]  # [rows, pos]

            def forward(x, *args, norm=norm, s=s, **kwargs):
                y = x.float()
                if norm.kind == "LN":
                    y = y - y.mean(-1, keepdim=True)
                # The baseline's scale, not this run's: the norm no longer amplifies what the ablation left.
                y = y / s.reshape(*y.shape[:-1], 1) * norm.gain + norm.bias
                return y.to(x.dtype)
            regs.append(lambda module=module, forward=forward: E.ForwardOverride(module, forward))
    return regs


_FROZEN_IMPL = "selfrepair_frozen"
# transformers looks attention functions up by name in a process-wide registry; the function finds the
# pattern of the module calling it here, filled only inside `frozen_attention`.
_PATTERNS: dict[int, tuple[Tensor, Tensor]] = {}


def _frozen_attention_fn(module, query, key, value, attention_mask, **kwargs):
    """Attention with the recorded probabilities times the recomputed values.

    The module's entry holds the baseline's probabilities cut to the pass's positions ([batch, head, q, k],
    a view) and the batch row of each pass row: each batch row's pattern multiplies, broadcast, the values
    of the pass rows that hold it (a pass may hold a row once per unit), so no pattern is copied per row.
    """
    got = _PATTERNS.get(id(module))
    if got is None:
        raise UnsupportedModel(f"{type(module).__name__}: frozen attention has no recorded pattern for this module")
    probs, rows = got
    rows = rows.repeat(value.shape[0] // len(rows))  # copies of the pass are batch-major
    v = value.float()
    b, kv, n, d = v.shape
    out = v.new_empty((b, probs.shape[1], n, d))
    for r in torch.unique(rows).tolist():
        at = torch.nonzero(rows == r)[:, 0]
        # Grouped or multi-query attention: each key/value head serves a group of query heads (broadcast).
        p = probs[r].view(kv, -1, n, n)  # [kv, group, q, k]
        out[at] = torch.matmul(p, v[at][:, :, None]).view(len(at), -1, n, d)
    _PATTERNS[-id(module)] = got  # marks the module as served
    return out.to(value.dtype).transpose(1, 2).contiguous(), None


def _register_interface() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_FROZEN_IMPL, _frozen_attention_fn)


@contextlib.contextmanager
def attention_implementation(w, name: str):
    """Every attention module's config set to the attention implementation `name`, restored after."""
    configs = {id(m.config): m.config for m in attention_modules(w) if hasattr(m, "config")}
    configs[id(w.model.config)] = w.model.config
    saved = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = name
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]


def _eager_calls(w, clean: E.CleanState, rows: Tensor) -> list[Call]:
    """Each decoder layer's call (masks, rotary tables) on `rows` as the model makes it under eager attention,
    from a forward whose layers return their input untouched: only the embedding, masks and tables are
    computed. (A call recorded under SDPA may carry no mask at all, SDPA being told it is causal instead.)"""
    def skip(i):
        def forward(*args, **kwargs):
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            return (h,) if clean.calls[i].tuple_out else h
        return forward

    lm_head = w.model.get_output_embeddings()
    regs = [lambda i=i, m=m: E.ForwardOverride(m, skip(i)) for i, m in enumerate(w.layers)]
    regs.append(lambda: E.ForwardOverride(lm_head, lambda x: x.new_zeros((*x.shape[:-1], 0))))
    with torch.no_grad(), attention_implementation(w, "eager"):
        calls, _, _ = capture_calls(w.model, w.layers, rows, regs)
    return calls


def clean_patterns(w, clean: E.CleanState, rows: Tensor, layers, sel: Tensor | None = None) -> dict[int, Tensor]:
    """Each of `layers`' attention probabilities ([row, head, q, k], float32) in the run `clean` of the batch
    `rows` (of its rows `sel` only, if given).

    A layer's pattern depends only on its input, which the run stores (`CleanState.resid_pre`), so each
    layer runs alone on it under eager attention (which returns its probabilities), and only up to its
    attention module; the calls (eager masks, rotary tables) come from `_eager_calls`.

    Raises:
        UnsupportedModel: a layer's attention returns no probabilities under eager attention.
    """
    run_rows = rows if sel is None else rows[sel]
    calls = _eager_calls(w, clean, run_rows)
    got: dict[int, Tensor] = {}

    def keep(i):
        def hook(module, args, out):
            if isinstance(out, tuple) and len(out) > 1 and isinstance(out[1], Tensor):
                got[i] = out[1].detach().float()
                raise Stop  # the rest of the layer is not needed
        return hook

    mods = attention_modules(w)
    with torch.no_grad(), attention_implementation(w, "eager"):
        for i in layers:
            x = clean.resid_pre[i] if sel is None else clean.resid_pre[i][sel]
            with hooks(lambda i=i: mods[i].register_forward_hook(keep(i))):
                try:
                    calls[i].run(w.layers[i], x, len(run_rows), 1)
                except Stop:
                    pass
    missing = [i for i in layers if i not in got]
    if missing:
        raise UnsupportedModel(f"{w.family.name}: layer {missing[0]}'s attention returned no probabilities under eager "
                               "attention, so its pattern cannot be recorded")
    return got


def record_patterns(w, base, first: int = 0) -> list[Tensor | None]:
    """Each layer's attention probabilities in the baseline run `base` (a FastBatch: the clean run, or the
    condition-ablated one), [layer] of [batch, head, q, k] (None before layer `first`): `clean_patterns`."""
    got = clean_patterns(w, base.clean, base.rows, range(first, w.n_layers))
    return [got.get(i) for i in range(w.n_layers)]


@contextlib.contextmanager
def frozen_attention(w, patterns: list[Tensor], cut: Cut, layer: int):
    """Within the block, layers `layer`… attend with the recorded patterns cut to the pass's rows and positions."""
    _register_interface()
    mods = attention_modules(w)
    # The first layer's attention does not run (ingest/engine.py returns its stored output plus the units'
    # change: its input, hence its pattern, is the baseline's already); every later layer's does.
    later = range(layer + 1, w.n_layers)
    for i in later:
        rows = torch.as_tensor(cut.rows, device=patterns[i].device)
        _PATTERNS[id(mods[i])] = (patterns[i][:, :, :cut.n_pos, :cut.n_pos], rows)
    try:
        with attention_implementation(w, _FROZEN_IMPL):
            yield
        skipped = [i for i in later if -id(mods[i]) not in _PATTERNS]
        if skipped:
            raise UnsupportedModel(f"{w.family.name}: layer {skipped[0]}'s attention did not go through "
                                   "transformers' AttentionInterface, so frozen-attention cannot replace its pattern")
    finally:
        for m in mods:
            _PATTERNS.pop(id(m), None)
            _PATTERNS.pop(-id(m), None)


# -- the re-runs of one batch -----------------------------------------------------------------
def _segments(cut: Cut) -> list[tuple[int, np.ndarray]]:
    """Each owner of a shared pass with its row positions in the pass (contiguous: `cuts_for` puts the rows
    unit by unit)."""
    owners = cut.owners()
    return [(int(j), np.nonzero(owners == j)[0]) for j in np.unique(owners)]


def shared_patch(clean: E.CleanState, layer: int, patches: list[E.Patch], cut: Cut) -> E.Patch:
    """One pass's replacements for a group of units of first layer `layer` (`pass_groups`): on each unit's
    rows its own values, and for the other units' components the baseline's, which change nothing there
    (the engine takes the first layer's change against the baseline's z; an MLP write is replaced by
    every unit of the group or by none)."""
    rows = lambda idx: torch.as_tensor(cut.rows[idx], device=clean.z.device)  # noqa: E731
    segments = [(patches[j], rows(idx)) for j, idx in _segments(cut)]
    heads = sorted({h for p in patches for h in p.heads.get(layer, {})})
    z = {h: torch.cat([p.heads[layer][h][r, :cut.n_pos] if h in p.heads.get(layer, {})
                       else clean.z[layer][r, :cut.n_pos, h] for p, r in segments]) for h in heads}
    mlps = {}
    if any(layer in p.mlps for p in patches):
        mlps[layer] = torch.cat([p.mlps[layer][r, :cut.n_pos] for p, r in segments])
    return E.Patch({layer: z} if z else {}, mlps)


@dataclass
class Rerun:
    """One counterfactual pass over a cut (`result`'s leading dim: the one copy), for one unit or a group."""

    cut: Cut
    logit: Tensor  # [rows, pos] correct-token logit minus b_U, at the counterfactual's final scale
    scale: Tensor  # [rows, pos] the final-norm scale the logit divides by
    result: E.PatchResult


def rerun(w, base, name: str, layer: int, patches: list[E.Patch], cut: Cut, u: Tensor,
          patterns: list[Tensor] | None = None, qk: QKScales | None = None) -> Rerun:
    """One counterfactual pass from `layer` over the cut's rows and positions.

    Args:
        w: the model's processed weights.
        base: the baseline FastBatch (its `clean` state and condition `base` patch).
        name: FROZEN_NORMS or FROZEN_ATTENTION.
        layer: the units' first layer.
        patches: the replacements of the units the cut serves (one, or a `pass_groups` group), over the
            whole batch.
        cut: the rows and positions to run.
        u: the correct tokens' processed unembedding columns, [batch, pos, d_model].
        patterns: the baseline's attention probabilities (`record_patterns`; frozen-attention only).
        qk: the baseline's query/key norm scales (`qk_norms.record_qk_scales`; frozen-norms, families with them).
    """
    state = cut_state(base.clean, cut, layer)
    rows = torch.as_tensor(cut.rows, device=u.device)
    u_c = u[rows, :cut.n_pos]
    # The batch's head projections (made once per batch, as the sweep's), cut like everything else.
    ou = base._projections(u)[:, rows, :cut.n_pos] if hasattr(base, "_projections") else E.head_projections(w, u_c)
    cond = cut_patch(base.base, cut) if base.base is not None else None
    patch = cut_patch(patches[0], cut) if cut.owner is None else shared_patch(base.clean, layer, patches, cut)
    if name == FROZEN_NORMS:
        ctx = hooks(*frozen_norm_hooks(w, state, layer), *frozen_qk_hooks(qk, layer, rows, cut.n_pos))
    else:
        ctx = frozen_attention(w, patterns, cut, layer)
    with torch.no_grad(), ctx:
        r = E.patch_layer(w, state, layer, [patch], u_c, ou, None, cond)
    if name == FROZEN_NORMS:
        # logit = resid·u / s_abl; the frozen final norm divides the same residual by the baseline's scale.
        return Rerun(cut, r.logit[0] * r.scale[0] / state.scale, state.scale, r)
    return Rerun(cut, r.logit[0], r.scale[0], r)


@dataclass
class UnitRerun:
    """One unit's counterfactual on its top tokens in one batch (tensors over those tokens, [tok, …])."""

    unit: object
    name: str
    tokens: np.ndarray  # global token indices
    logit: Tensor  # correct-token logit minus b_U
    ln_scale: Tensor
    de: Tensor  # the unit's DE after patching, at the baseline's final scale
    d_heads: Tensor  # [tok, layer·head] ΔDE of every head outside the unit
    d_mlps: Tensor  # [tok, layer]

    def finite(self) -> UnitRerun:
        """Its tokens whose re-run stayed within float32. Under frozen norms nothing rescales the residual: on
        some models (SmolLM2's early heads) it grows layer by layer past float32's range, and a token's
        values are then no numbers at all; they are left out, never stored."""
        ok = (torch.isfinite(self.logit) & torch.isfinite(self.ln_scale) & torch.isfinite(self.de)
              & torch.isfinite(self.d_heads).all(-1) & torch.isfinite(self.d_mlps).all(-1))
        if bool(ok.all()):
            return self
        keep = ok.cpu().numpy()
        return replace(self, tokens=self.tokens[keep], logit=self.logit[ok], ln_scale=self.ln_scale[ok], de=self.de[ok],
                       d_heads=self.d_heads[ok], d_mlps=self.d_mlps[ok])


def batch_reruns(w, base, units, top_sets: dict, names, make_patch, u: Tensor, row0: int, preds: int,
                 per_pass: int | None = None):
    """Every requested counterfactual of every unit with top tokens in this batch.

    Units of one first layer share passes as the sweep's do (`pass_groups`, `per_pass` at a time), but
    each runs only its own rows: a pass holds, unit by unit, the rows holding one of that unit's top
    tokens, and the (unit, row) pairs are split into passes by their last top position (`cuts_for`). A
    unit's values so depend on its group's units only through the shapes of the pass's products (float32
    rounding), as the sweep's values do; a unit of another layer changes nothing.

    Args:
        w: processed weights.
        base: the baseline FastBatch (clean, or condition-ablated).
        units: the batch's units; top_sets: their top-p% token indices in this batch, by label.
        names: the counterfactuals to run.
        make_patch: unit -> its `Patch` over the whole batch.
        u: [batch, pos, d_model] target columns; row0: the batch's first row; preds: predictions per row.
        per_pass: units sharing a pass at most (the sweep's units per pass; None: every unit of a layer).

    Yields:
        `UnitRerun` per unit with a top token here and counterfactual.
    """
    if not hasattr(base, "clean"):
        raise ConfigError("counterfactuals: run with the fast engine (--engine fast)")
    t0 = row0 * preds
    batch = u.shape[0]
    groups = batch_groups(top_sets, units, t0, t0 + batch * preds, w.n_heads, per_pass or max(len(units), 1),
                          w.post_norm)
    # Recorded once per batch, and only when some unit has a top token in it.
    patterns, qk, qk_recorded = None, None, False
    for group, local in groups:
        cuts = cuts_for(local, preds)
        patches = [make_patch(unit) for unit in group]
        layer = group[0].layer
        for name in names:
            if name == FROZEN_ATTENTION and patterns is None:  # the earliest first layer's attention does not run
                patterns = record_patterns(w, base, min(g[0].layer for g, _ in groups) + 1)
            if name == FROZEN_NORMS and not qk_recorded:
                qk, qk_recorded = record_qk_scales(w, base), True
            parts = [rerun(w, base, name, layer, patches, cut, u, patterns, qk) for cut in cuts]
            for j, unit in enumerate(group):
                own = None if len(group) == 1 else functools.partial(_own_de, w, patches[j], layer, u=u, base=base)
                yield _gather(unit, j, name, local[j], t0, preds, parts, u.device, own)


def _own_de(w, patch: E.Patch, layer: int, rows: Tensor, pos: Tensor, u: Tensor, base) -> Tensor:
    """A unit's DE after patching at the given tokens, at the baseline's final scale, from its own
    replacements (as the engine's `_own_heads`, `_own_mlps` do): a shared pass's `de` sums the group."""
    s = base.clean.scale[rows, pos]
    out = torch.zeros_like(s)
    if patch.heads.get(layer):
        ou = base._projections(u)[layer] if hasattr(base, "_projections") else E.head_projections(w, u)[layer]
        for h, z in patch.heads[layer].items():
            out += (z[rows, pos] * ou[rows, pos, h]).sum(-1) / s
    if layer in patch.mlps:
        out += (patch.mlps[layer][rows, pos] * u[rows, pos]).sum(-1) / s
    return out


def _gather(unit, j: int, name: str, local: np.ndarray, t0: int, preds: int, parts: list, device,
            own=None) -> UnitRerun:
    """Unit j's values at its tokens (batch-local, sorted) from the passes over each cut; `own` ((rows, pos)
    -> its `_own_de` there) when the passes were shared: its DE is then its own part."""
    rows, pos = local // preds, local % preds
    which = np.full(len(local), -1, np.int64)
    at = np.zeros(len(local), np.int64)
    for c, part in enumerate(parts):
        mine = np.nonzero(part.cut.owners() == j)[0]  # its rows in this pass, in row order
        inside = np.isin(rows, part.cut.rows[mine])
        which[inside], at[inside] = c, mine[np.searchsorted(part.cut.rows[mine], rows[inside])]
    cols = {k: [] for k in ("logit", "scale", "de", "d_heads", "d_mlps")}
    order = []
    for c, part in enumerate(parts):
        sel = np.nonzero(which == c)[0]
        if not len(sel):
            continue
        ri, pi = (torch.as_tensor(a[sel], device=device) for a in (at, pos))
        res = part.result
        cols["logit"].append(part.logit[ri, pi])
        cols["scale"].append(part.scale[ri, pi])
        cols["de"].append(res.de[0, ri, pi] if own is None else
                          own(torch.as_tensor(rows[sel], device=device), pi))
        cols["d_heads"].append(res.d_de_heads[0, ri, pi].reshape(len(sel), -1))
        cols["d_mlps"].append(res.d_de_mlps[0, ri, pi])
        order.append(sel)
    back = torch.as_tensor(np.argsort(np.concatenate(order), kind="stable"), device=device)
    v = {k: torch.cat(x)[back] for k, x in cols.items()}
    return UnitRerun(unit, name, local + t0, v["logit"], v["scale"], v["de"], v["d_heads"], v["d_mlps"])
