"""The ablation pass over one batch: replacement z, patched passes, and the rows they yield.

Two engines share one interface (`clean_z`, `clean_logit`, `post_final`, `patch`):
`FastBatch` (ingest/engine.py, the FLOP-minimal sweep) and `ReferenceBatch` (one full
hooked TransformerBridge forward per head, patching `blocks.{L}.attn.hook_z`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import torch

from selfrepair.errors import ConfigError
from selfrepair.ingest import engine as E
from selfrepair.ingest.weights import Weights
from selfrepair.store.schema import SRC_KINDS


class FastBatch:
    """The fast engine on one batch: its own float32 clean run is the baseline of every patch."""

    def __init__(self, w: Weights, rows: torch.Tensor, dtype: torch.dtype | None = None,
                 clean: E.CleanState | None = None):
        self.w, self.dtype = w, dtype  # the sweep's matrix products (None: float32), `IngestConfig.dtype`
        self.clean = clean if clean is not None else E.clean_run(w, rows, with_linears=dtype is not None)
        self._ou = None  # head projections, made on the first patch

    def clean_z(self, layer: int) -> torch.Tensor:
        return self.clean.z[layer]  # [batch, pos, head, d_head]

    def clean_logit(self, u: torch.Tensor) -> torch.Tensor:
        return (self.clean.resid_final * u).sum(-1) / self.clean.scale

    def post_final(self) -> torch.Tensor:
        return self.clean.post_final

    def scale(self) -> torch.Tensor:
        return self.clean.scale

    def patch(self, layer: int, heads: list[int], z_new: torch.Tensor, u: torch.Tensor) -> E.PatchResult:
        if self._ou is None:
            self._ou = E.head_projections(self.w, u)
        return E.patch_layer(self.w, self.clean, layer, heads, z_new, u, self._ou, self.dtype)


class ReferenceBatch:
    """The straightforward method: a full hooked TransformerBridge forward per head.

    Uses the bridge's own processed weights (`bridge.W_O`, `bridge.b_U`) and hooks, so it
    shares nothing with the fast engine but the definitions.
    """

    def __init__(self, bridge, rows: torch.Tensor):
        self.bridge, self.rows = bridge, rows
        self.n_layers = n = bridge.cfg.n_layers
        self.W_O = bridge.W_O.detach().float()
        self.b_U = bridge.b_U.detach().float()
        self.names = {f"blocks.{l}.attn.hook_z" for l in range(n)} | {
            f"blocks.{l}.hook_mlp_out" for l in range(n)} | {
            "ln_final.hook_scale", f"blocks.{n - 1}.mlp.hook_post"}
        self.logits, self.cache = self._run([])

    def _run(self, hooks):
        with torch.no_grad(), self.bridge.hooks(fwd_hooks=hooks):
            return self.bridge.run_with_cache(self.rows, names_filter=lambda n: n in self.names)

    def clean_z(self, layer: int) -> torch.Tensor:
        return self.cache[f"blocks.{layer}.attn.hook_z"]

    def scale(self) -> torch.Tensor:
        return self.cache["ln_final.hook_scale"][..., 0]

    def _logit(self, logits: torch.Tensor) -> torch.Tensor:
        y = self.rows.roll(-1, dims=1)  # the last position's target is a dummy, dropped later
        return logits.gather(-1, y[..., None])[..., 0] - self.b_U[y]

    def clean_logit(self, u: torch.Tensor) -> torch.Tensor:
        return self._logit(self.logits)

    def post_final(self) -> torch.Tensor:
        return self.cache[f"blocks.{self.n_layers - 1}.mlp.hook_post"]

    def patch(self, layer: int, heads: list[int], z_new: torch.Tensor, u: torch.Tensor) -> E.PatchResult:
        s, n = self.scale(), self.n_layers
        out = {k: [] for k in ("logit", "scale", "de_head", "d_de_heads", "d_de_mlps", "post_final")}
        for i, head in enumerate(heads):
            def hook(z, hook, head=head, value=z_new[i]):
                z = z.clone()
                z[:, :, head] = value
                return z

            logits, cache = self._run([(f"blocks.{layer}.attn.hook_z", hook)])
            dz = torch.stack([cache[f"blocks.{l}.attn.hook_z"] - self.clean_z(l) for l in range(n)], 2)
            d_heads = torch.einsum("bplhd,lhdm,bpm->bplh", dz, self.W_O, u) / s[..., None, None]
            d_heads[:, :, layer, head] = 0  # the ablated head's own change is d_de, not d_de_heads
            dm = torch.stack([cache[f"blocks.{l}.hook_mlp_out"] - self.cache[f"blocks.{l}.hook_mlp_out"]
                              for l in range(n)], 2)
            out["logit"].append(self._logit(logits))
            out["scale"].append(cache["ln_final.hook_scale"][..., 0])
            out["de_head"].append(torch.einsum("bpd,dm,bpm->bp", z_new[i], self.W_O[layer, head], u) / s)
            out["d_de_heads"].append(d_heads)
            out["d_de_mlps"].append(torch.einsum("bplm,bpm->bpl", dm, u) / s[..., None])
            out["post_final"].append(cache[f"blocks.{n - 1}.mlp.hook_post"])
        return E.PatchResult(**{k: torch.stack(v) for k, v in out.items()})


def replacement_z(kind: str, clean_z: torch.Tensor, source_z: torch.Tensor | None) -> torch.Tensor:
    """The z that replaces a layer's heads: [batch, pos, head, d_head].

    resample: the source row's z at the same position; mean: the head's mean over the
    batch's rows and positions; zero: 0.
    """
    if kind == "resample":
        return source_z
    if kind == "mean":
        return clean_z.mean(dim=(0, 1), keepdim=True).expand_as(clean_z)
    return torch.zeros_like(clean_z)


def _patched(ctx, src, kind: str, heads: list[tuple[int, int]], u: torch.Tensor, heads_per_pass: int):
    """Patch every head in `heads`, layer by layer, `heads_per_pass` at a time.

    Yields:
        (layer, chunk, result): the heads of one pass and their `PatchResult`.
    """
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    for layer, layer_heads in sorted(by_layer.items()):
        z_rep = replacement_z(kind, ctx.clean_z(layer), src.clean_z(layer) if src is not None else None)
        for start in range(0, len(layer_heads), heads_per_pass):
            chunk = layer_heads[start:start + heads_per_pass]
            z_new = z_rep[:, :, chunk].permute(2, 0, 1, 3)  # [k, batch, pos, d_head]
            yield layer, chunk, ctx.patch(layer, chunk, z_new, u)


class _Batch:
    """What every pass over one batch shares: targets, clean logit and scale, token indices, neuron DE units."""

    def __init__(self, ctx, rows: torch.Tensor, row0: int, w: Weights):
        batch, seq = rows.shape
        self.preds = preds = seq - 1
        y = rows.roll(-1, dims=1)  # [batch, pos]; the last position is a dummy, dropped below
        self.u = w.target_columns(y)
        self.clean_logit = ctx.clean_logit(self.u)
        s = ctx.scale()
        self.token_index = ((row0 + np.arange(batch)[:, None]) * preds + np.arange(preds)[None, :]).reshape(-1)
        self.n = batch * preds
        # Each final-MLP neuron's DE per unit of activation: W_out[last, n] · u / s.
        self.wu = torch.einsum("nm,bpm->bpn", w.W_out_final, self.u.float())[:, :preds] / s[:, :preds, None].float()
        self.post_clean = ctx.post_final()[:, :preds].float()

    def mask(self, tokens: np.ndarray | None) -> np.ndarray:
        return np.isin(self.token_index, tokens) if tokens is not None and len(tokens) else np.zeros(self.n, bool)

    def neurons(self, r: E.PatchResult, i: int, layer: int, head: int, mask: np.ndarray, k: int):
        """Neuron rows and totals of head `i` of a pass on the tokens in `mask` (float32 DEs, as stored)."""
        sel = torch.from_numpy(np.nonzero(mask)[0]).to(self.u.device)
        de_c = (self.post_clean * self.wu).reshape(self.n, -1)[sel]  # [tok, d_mlp]
        de_a = (r.post_final[i, :, :self.preds].float() * self.wu).reshape(self.n, -1)[sel]
        return _neuron_rows(layer, head, self.token_index[mask], de_c, de_a, k)


def ablation_tables(
    ctx, src, kind: str, sample: int, heads: list[tuple[int, int]], rows: torch.Tensor,
    row0: int, top_sets: dict[tuple[int, int], np.ndarray], neurons_top_k: int,
    heads_per_pass: int, w: Weights, on_pass: Callable[[int], None] = lambda n: None,
    attention_top_k: int = 8,
) -> dict[str, pa.Table]:
    """Ablate every head in `heads` on one batch and build the ablation tables' rows.

    Args:
        ctx: FastBatch or ReferenceBatch over the batch's rows.
        src: the same over the resample source rows (resample only), else None.
        kind: resample, mean or zero.
        sample: resample draw (0 for mean and zero).
        heads: (layer, head) pairs to ablate.
        rows: token ids [batch, seq_len].
        row0: global index of the batch's first row.
        top_sets: each head's top-p% token indices (global, sorted).
        neurons_top_k: final-MLP neurons kept at each end of the signed ranking, per head and top token.
        heads_per_pass: heads batched into one patched pass.
        w: the model's processed weights (float32): structure, target columns, neuron DEs.
        on_pass: called with the number of head-token ablations done after each pass.
        attention_top_k: attention sources kept per head and top token (0: none).

    Returns:
        Arrow tables `ablation_effects`, `ablation_top` (its rows on top-p% tokens),
        `repair_sources`, `neuron_effects`, `neuron_totals`, `attention_top`.
    """
    b = _Batch(ctx, rows, row0, w)
    preds, n, token_index = b.preds, b.n, b.token_index
    eff, rep, neu, tot, top_masks, mask_heads = [], [], [], [], [], []
    for layer, chunk, r in _patched(ctx, src, kind, heads, b.u, heads_per_pass):
        for i, head in enumerate(chunk):
            cut = lambda t: t[i, :, :preds]  # noqa: E731 - [k, batch, pos, ...] -> [batch, preds, ...]
            eff.append({
                "layer": layer, "head": head,
                "d_logit": (cut(r.logit) - b.clean_logit[:, :preds]).reshape(-1),
                "ln_scale": cut(r.scale).reshape(-1),
                "de": cut(r.de_head).reshape(-1),
                "d_de_heads": cut(r.d_de_heads).sum((-1, -2)).reshape(-1),
                "d_de_mlps": cut(r.d_de_mlps).sum(-1).reshape(-1),
            })
            mask = b.mask(top_sets.get((layer, head)))
            top_masks.append(mask)
            mask_heads.append((layer, head))
            if not mask.any():
                continue
            sel = torch.from_numpy(np.nonzero(mask)[0]).to(b.u.device)
            rep.append(_repair_rows(w, layer, head, token_index[mask],
                                    cut(r.d_de_heads).reshape(n, -1)[sel],
                                    cut(r.d_de_mlps).reshape(n, -1)[sel]))
            if neurons_top_k:
                rows_, totals = b.neurons(r, i, layer, head, mask, neurons_top_k)
                neu.append(rows_)
                tot.append(totals)
        on_pass(len(chunk) * n)
    out = _assemble(kind, sample, token_index, eff, rep, neu, tot, top_masks)
    att = attention_rows(w, rows, row0, mask_heads, top_masks, token_index, attention_top_k)
    if att is not None:
        out["attention_top"] = _concat(att, kind, sample)
    return out


def neuron_detail_tables(
    ctx, src, kind: str, sample: int, detail_sets: dict[tuple[int, int], np.ndarray], rows: torch.Tensor,
    row0: int, neurons_top_k: int, heads_per_pass: int, w: Weights,
    on_pass: Callable[[int], None] = lambda n: None,
) -> dict[str, pa.Table]:
    """Neuron detail only, for extra tokens of some heads (`--sr-mlps-neurons`): re-patch just those heads.

    Args:
        ctx, src, kind, sample, rows, row0, heads_per_pass, w, on_pass: as `ablation_tables`.
        detail_sets: (layer, head) -> the token indices (global, sorted) to store neuron rows for;
            heads with an empty set are not patched.
        neurons_top_k: as `ablation_tables` (positive).

    Returns:
        Arrow tables `neuron_effects` and `neuron_totals`; none when no head has a token here (a shard
        that only supersedes stale detail).
    """
    heads = sorted(key for key, toks in detail_sets.items() if len(toks))
    neu, tot = [], []
    if heads:
        b = _Batch(ctx, rows, row0, w)
        for layer, chunk, r in _patched(ctx, src, kind, heads, b.u, heads_per_pass):
            for i, head in enumerate(chunk):
                rows_, totals = b.neurons(r, i, layer, head, b.mask(detail_sets[(layer, head)]), neurons_top_k)
                neu.append(rows_)
                tot.append(totals)
            on_pass(len(chunk) * b.n)
    if not neu:
        return {}
    return {"neuron_effects": _concat(neu, kind, sample), "neuron_totals": _concat(tot, kind, sample)}


def attention_rows(w, rows: torch.Tensor, row0: int, heads, top_masks, token_index, k: int):
    """Per ablated head and top token, the k source positions with the largest clean attention weight.

    One forward of the model with eager attention (which returns its probabilities) per
    batch that holds top tokens; None when none of `heads` has a top token here.
    """
    if not k or not any(m.any() for m in top_masks):
        return None
    batch, seq = rows.shape
    preds = seq - 1
    model = w.model
    previous = getattr(model.config, "_attn_implementation", None)
    try:
        model.set_attn_implementation("eager")
        with torch.no_grad():
            patterns = model(rows, output_attentions=True, use_cache=False).attentions  # [layer] [b, h, q, k]
    finally:
        if previous and previous != "eager":
            model.set_attn_implementation(previous)
    parts = []
    for (layer, head), mask in zip(heads, top_masks):
        if not mask.any():
            continue
        idx = np.nonzero(mask)[0]
        b, q = idx // preds, idx % preds
        p = patterns[layer][torch.from_numpy(b), head, torch.from_numpy(q)].float()  # [n, seq] over keys
        kk = min(k, seq)
        weight, src = p.topk(kk, dim=-1)
        weight, src = weight.cpu().numpy(), src.cpu().numpy()
        rank = np.tile(np.arange(1, kk + 1, dtype=np.int16), (len(idx), 1))
        keep = src <= q[:, None]  # causal: a query sees positions up to its own
        parts.append({"layer": layer, "head": head, "token_index": np.repeat(token_index[idx], kk)[keep.reshape(-1)],
                      "rank": rank[keep], "src_pos": src[keep].astype(np.int16),
                      "src_token_index": ((row0 + b[:, None]) * preds + src)[keep].astype(np.int32),
                      "weight": weight[keep]})
    return parts


def _repair_rows(w, layer, head, tokens, d_heads, d_mlps) -> dict:
    """Every downstream head and MLP whose DE can change: heads after `layer`, MLPs from it."""
    first_mlp = layer + 1 if w.parallel else layer
    hl = [(l, h) for l in range(layer + 1, w.n_layers) for h in range(w.n_heads)]
    ml = list(range(first_mlp, w.n_layers))
    cols_h = [l * w.n_heads + h for l, h in hl]
    vals = torch.cat([d_heads[:, cols_h], d_mlps[:, ml]], 1).float().cpu().numpy()  # [tok, comp]
    head_kind, mlp_kind = SRC_KINDS
    kinds = np.array([head_kind] * len(hl) + [mlp_kind] * len(ml))
    src_layer = np.array([l for l, _ in hl] + ml, dtype=np.int16)
    src_head = np.array([h for _, h in hl] + [-1] * len(ml), dtype=np.int16)
    c = len(kinds)
    return {"layer": layer, "head": head, "token_index": np.repeat(tokens, c),
            "src_kind": np.tile(kinds, len(tokens)), "src_layer": np.tile(src_layer, len(tokens)),
            "src_head": np.tile(src_head, len(tokens)), "d_de": vals.reshape(-1)}


def _neuron_rows(layer, head, tokens, de_c, de_a, k) -> tuple[dict, dict]:
    """The neuron rows whose signed ΔDE ranks in the top k or bottom k, and the per-token totals.

    Args:
        tokens: global token indices [tok].
        de_c, de_a: each final-MLP neuron's clean and ablated DE (float32) [tok, d_mlp].
        k: neurons kept at each end of the ranking.

    Returns:
        (`neuron_effects` columns, `neuron_totals` columns) for `_concat`.
    """
    d = de_a - de_c  # float32, exactly the difference of the two stored columns' sources
    d_mlp = d.shape[1]
    if d_mlp > np.iinfo(np.int16).max:  # neuron_effects.rank is int16: never store a wrapped rank
        raise ConfigError(f"neurons: d_mlp {d_mlp} exceeds the int16 rank column of neuron_effects; "
                          "use --neurons-top-k 0")
    # Rank 1 = largest ΔDE; ties to the lower neuron index (a stable sort keeps index order).
    order = torch.sort(d, dim=1, descending=True, stable=True).indices  # [tok, d_mlp]
    if d_mlp <= 2 * k:
        pos = torch.arange(d_mlp, device=d.device)
    else:
        pos = torch.cat([torch.arange(k), torch.arange(d_mlp - k, d_mlp)]).to(d.device)
    idx = order[:, pos]  # [tok, kept]
    kept = len(pos)
    rows = {"layer": layer, "head": head, "token_index": np.repeat(tokens, kept),
            "neuron": idx.reshape(-1).cpu().numpy().astype(np.int32),
            "rank": np.tile(pos.cpu().numpy() + 1, len(tokens)).astype(np.int16),
            "de_clean": de_c.gather(1, idx).reshape(-1).cpu().numpy(),
            "de_ablated": de_a.gather(1, idx).reshape(-1).cpu().numpy()}
    d64 = d.double()  # sums over thousands of neurons: accumulate in float64, store float32
    totals = {"layer": layer, "head": head, "token_index": np.asarray(tokens),
              "d_de_sum": d64.sum(1).float().cpu().numpy(),
              "d_de_abs_sum": d64.abs().sum(1).float().cpu().numpy(),
              "d_de_pos_sum": d64.clamp(min=0).sum(1).float().cpu().numpy()}
    return rows, totals


def _concat(parts: list[dict], kind: str, sample: int) -> pa.Table:
    """Stack per-head column dicts (scalars broadcast) and add the ablation and sample columns."""
    columns: dict[str, list[np.ndarray]] = {}
    for part in parts:
        n = next(len(v) for v in part.values() if not np.isscalar(v))
        for key, value in part.items():
            if isinstance(value, torch.Tensor):
                value = value.float().cpu().numpy()
            columns.setdefault(key, []).append(np.full(n, value) if np.isscalar(value) else value)
    data = {k: np.concatenate(v) for k, v in columns.items()}
    n = len(data["token_index"])
    data["ablation"] = np.full(n, kind, dtype=object)
    data["sample"] = np.full(n, sample, dtype=np.int16)
    return pa.table(data)


def _assemble(kind, sample, token_index, eff, rep, neu, tot, top_masks) -> dict[str, pa.Table]:
    for part in eff:
        part["token_index"] = token_index
    out = {"ablation_effects": _concat(eff, kind, sample)}
    # The rows of the heads' top-p% tokens again, as their own small table (possibly empty):
    # per-head questions on top tokens (Figure 1) read 2% of the rows instead of all.
    out["ablation_top"] = out["ablation_effects"].filter(pa.array(np.concatenate(top_masks)))
    if rep:
        out["repair_sources"] = _concat(rep, kind, sample)
    if neu:
        out["neuron_effects"] = _concat(neu, kind, sample)
        out["neuron_totals"] = _concat(tot, kind, sample)
    return out
