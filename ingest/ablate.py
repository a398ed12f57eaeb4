"""The ablation pass over one batch: replacement values, patched passes, and the rows they yield.

Two engines share one interface (`clean_z`, `clean_mlp`, `clean_logit`, `scale`, `post_final`,
`component_des`, `conditioned`, `patch`): `FastBatch` (ingest/engine.py, the FLOP-minimal
sweep) and `ReferenceBatch` (one full hooked TransformerBridge forward per unit, patching
`blocks.{L}.attn.hook_z` and `blocks.{L}.hook_mlp_out`).

What is ablated is a unit (store/labels.py: a head, a group of heads, ATTNn, MLPn, BLOCKn),
optionally on top of a condition unit U0 (`U | U0`): the baseline is then the U0-ablated run
(`ctx.conditioned`), and every row is measured against it. Replacement values always come
from the clean runs (the batch's, or the resample source rows'), the condition's too.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import torch

from selfrepair.errors import ConfigError
from selfrepair.ingest import engine as E
from selfrepair.ingest.families import ARCHITECTURES, FAMILIES, REFUSED, moe_problem
from selfrepair.ingest.layer_calls import Stop, hooks
from selfrepair.ingest.output_metrics import VOCAB_CHUNK, Baseline, OutputHead, full_metrics
from selfrepair.ingest.weights import Weights
from selfrepair.store.labels import UNIT_KINDS, Unit, parse_unit
from selfrepair.store.schema import SRC_KINDS


class FastBatch:
    """The fast engine on one batch: its own float32 clean run is the baseline of every patch.

    Args:
        w: the model's processed weights.
        rows: token ids [batch, seq_len].
        dtype: the sweep's matrix products (None: float32), `IngestConfig.dtype`.
        clean: the batch's clean run, if already made.
        base: a condition's replacements: the baseline is then that ablated run (`conditioned`).
        source: the batch is only a resample source (its replacement values are all that is read):
            its clean run skips the unembedding and, in low precision, the projections' baselines.
        metrics: compute the output metrics (`IngestConfig.output_metrics`), walking the vocabulary
            `vocab_chunk` entries at a time.
        logits: keep the model's whole logits in `clean` (`CleanState.logits`, as the self-check reads
            them). The sweep never reads them (its logits are dot products with the target columns, its
            output metrics walk the vocabulary from `resid_final`), so the runner leaves the
            full-vocabulary product out.
    """

    def __init__(self, w: Weights, rows: torch.Tensor, dtype: torch.dtype | None = None,
                 clean: E.CleanState | None = None, base: E.Patch | None = None, source: bool = False,
                 metrics: bool = False, vocab_chunk: int = VOCAB_CHUNK, logits: bool = True):
        self.w, self.rows, self.dtype, self.base = w, rows, dtype, base
        self.metrics, self.vocab_chunk, self.logits = metrics, vocab_chunk, logits and not source
        self.clean = clean if clean is not None else E.clean_run(
            w, rows, with_linears=dtype is not None and not source, replace=base, logits=self.logits)
        self._ou = None  # head projections, made on first use
        self._output = None  # the baseline's output distribution, made on first use

    def conditioned(self, base: E.Patch) -> FastBatch:
        """The same batch with the baseline ablated by `base` (one more forward of the batch)."""
        return FastBatch(self.w, self.rows, self.dtype, base=base, metrics=self.metrics, vocab_chunk=self.vocab_chunk,
                         logits=self.logits)

    def output(self) -> Baseline | None:
        """The baseline run's output distribution (loss, entropy per token), or None with metrics off."""
        if self.metrics and self._output is None:
            head = OutputHead.of(self.w, self.vocab_chunk)
            self._output = Baseline.of(head, self.clean.resid_final, self.rows.roll(-1, dims=1))
        return self._output

    def clean_z(self, layer: int) -> torch.Tensor:
        return self.clean.z[layer]  # [batch, pos, head, d_head]

    def clean_mlp(self, layer: int) -> torch.Tensor:
        return self.clean.mlp_write[layer]  # [batch, pos, d_model]

    def clean_logit(self, u: torch.Tensor) -> torch.Tensor:
        return (self.clean.resid_final * u).sum(-1) / self.clean.scale

    def post_final(self) -> torch.Tensor:
        return self.clean.post_final

    def scale(self) -> torch.Tensor:
        return self.clean.scale

    def _projections(self, u: torch.Tensor) -> torch.Tensor:
        if self._ou is None:
            self._ou = E.head_projections(self.w, u)
        return self._ou

    def component_des(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every head's [batch, pos, layer, head] and MLP's [batch, pos, layer] DE in the baseline run."""
        return E.component_des(self.clean, u, self._projections(u))

    def patch(self, layer: int, heads: list, z_new: torch.Tensor | None, u: torch.Tensor) -> E.PatchResult:
        """One pass from `layer`: `heads` are head indices of `layer` with their new z in `z_new`
        ([k, batch, pos, d_head]), or `Patch`es (one unit each) with `z_new` None."""
        patches = E.head_patches(layer, heads, z_new) if z_new is not None else heads
        return E.patch_layer(self.w, self.clean, layer, patches, u, self._projections(u), self.dtype, self.base,
                             self.output())


class ReferenceBatch:
    """The straightforward method: a full hooked TransformerBridge forward per unit.

    Uses the bridge's own processed weights (`bridge.W_O`, `bridge.b_U`) and hooks, so it
    shares nothing with the fast engine but the definitions. A condition's replacements
    (`base`) are hooked into every forward, the baseline's too.
    """

    def __init__(self, bridge, rows: torch.Tensor, base: E.Patch | None = None, metrics: bool = False):
        self.bridge, self.rows, self.base, self.metrics = bridge, rows, base or E.Patch(), metrics
        self.n_layers = n = bridge.cfg.n_layers
        self.W_O = bridge.W_O.detach().float()
        self.b_U = bridge.b_U.detach().float()
        self.names = {f"blocks.{l}.attn.hook_z" for l in range(n)} | {
            f"blocks.{l}.hook_mlp_out" for l in range(n)} | {
            "ln_final.hook_scale", f"blocks.{n - 1}.mlp.hook_post"}
        self.logits, self.cache = self._run(self.base)

    def conditioned(self, base: E.Patch) -> ReferenceBatch:
        return ReferenceBatch(self.bridge, self.rows, base, self.metrics)

    def output(self):
        """The baseline's loss and entropy per token from its whole logits (None with metrics off)."""
        if not self.metrics:
            return None
        y = self.rows.roll(-1, dims=1)
        lp = torch.log_softmax(self.logits.float(), -1)
        return _WholeBaseline(-lp.gather(-1, y[..., None])[..., 0], -(lp.exp() * lp).sum(-1))

    def _run(self, patch: E.Patch):
        """A full forward with `patch`'s heads' `hook_z` and MLPs' `hook_mlp_out` replaced."""
        hooks = []
        for layer, heads in patch.heads.items():
            def z_hook(z, hook, heads=heads):
                z = z.clone()
                for h, value in heads.items():
                    z[:, :, h] = value
                return z
            hooks.append((f"blocks.{layer}.attn.hook_z", z_hook))
        for layer, value in patch.mlps.items():
            hooks.append((f"blocks.{layer}.hook_mlp_out", lambda x, hook, value=value: value.to(x.dtype).clone()))
        with torch.no_grad(), self.bridge.hooks(fwd_hooks=hooks):
            return self.bridge.run_with_cache(self.rows, names_filter=lambda n: n in self.names)

    def clean_z(self, layer: int) -> torch.Tensor:
        return self.cache[f"blocks.{layer}.attn.hook_z"]

    def clean_mlp(self, layer: int) -> torch.Tensor:
        return self.cache[f"blocks.{layer}.hook_mlp_out"]

    def scale(self) -> torch.Tensor:
        return self.cache["ln_final.hook_scale"][..., 0]

    def _logit(self, logits: torch.Tensor) -> torch.Tensor:
        y = self.rows.roll(-1, dims=1)  # the last position's target is a dummy, dropped later
        return logits.gather(-1, y[..., None])[..., 0] - self.b_U[y]

    def clean_logit(self, u: torch.Tensor) -> torch.Tensor:
        return self._logit(self.logits)

    def post_final(self) -> torch.Tensor:
        return self.cache[f"blocks.{self.n_layers - 1}.mlp.hook_post"]

    def _des(self, cache, u: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every head's and MLP's DE in a run's cache, at scale `s`."""
        z = torch.stack([cache[f"blocks.{l}.attn.hook_z"] for l in range(self.n_layers)], 2)
        m = torch.stack([cache[f"blocks.{l}.hook_mlp_out"] for l in range(self.n_layers)], 2)
        return (torch.einsum("bplhd,lhdm,bpm->bplh", z, self.W_O, u) / s[..., None, None],
                torch.einsum("bplm,bpm->bpl", m, u) / s[..., None])

    def component_des(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._des(self.cache, u, self.scale())

    def patch(self, layer: int, heads: list, z_new: torch.Tensor | None, u: torch.Tensor) -> E.PatchResult:
        """As `FastBatch.patch`, one full forward per unit (with the condition's replacements)."""
        patches = E.head_patches(layer, heads, z_new) if z_new is not None else heads
        s, n = self.scale(), self.n_layers
        base_h, base_m = self._des(self.cache, u, s)
        out = {k: [] for k in ("logit", "scale", "de", "d_de_heads", "d_de_mlps", "post_final")}
        out |= {k: [] for k in (("d_loss", "kl", "d_entropy", "top1_changed") if self.metrics else ())}
        for p in patches:
            both = E.Patch({l: {**self.base.heads.get(l, {}), **p.heads.get(l, {})}
                            for l in {*self.base.heads, *p.heads}}, {**self.base.mlps, **p.mlps})
            logits, cache = self._run(both)
            de_h, de_m = self._des(cache, u, s)
            d_heads, d_mlps = de_h - base_h, de_m - base_m  # every DE at the baseline's scale
            # The unit's own DE from its replacement values; its change is d_de, not d_de_heads or d_de_mlps.
            de = torch.zeros_like(s)
            for l, hs in p.heads.items():
                for h, value in hs.items():
                    de += torch.einsum("bpd,dm,bpm->bp", value, self.W_O[l, h], u) / s
                    d_heads[:, :, l, h] = 0
            for l, value in p.mlps.items():
                de += (value * u).sum(-1) / s
                d_mlps[:, :, l] = 0
            out["logit"].append(self._logit(logits))
            out["scale"].append(cache["ln_final.hook_scale"][..., 0])
            out["de"].append(de)
            out["d_de_heads"].append(d_heads)
            out["d_de_mlps"].append(d_mlps)
            out["post_final"].append(cache[f"blocks.{n - 1}.mlp.hook_post"])
            if self.metrics:  # from the bridge's whole logits: full-vocabulary softmaxes
                for key, value in full_metrics(self.logits, logits, self.rows.roll(-1, dims=1)).items():
                    out[key].append(value)
        return E.PatchResult(**{k: torch.stack(v) for k, v in out.items()})


class _WholeBaseline:
    """The baseline's loss and entropy per token ([batch, pos]), as `output_metrics.Baseline` has them."""

    def __init__(self, loss: torch.Tensor, entropy: torch.Tensor):
        self.loss, self.entropy = loss, entropy


def unit_kind_problem(family: str, kind: str) -> str | None:
    """Why units of `kind` are not defined for `family` (a family's name, e.g. "Gemma 2", or its Hugging
    Face architecture, e.g. "MixtralForCausalLM"), or None. Needs no model, so a run can ask before loading.

    Every supported family defines every kind: a head replaces its processed z, an MLP its write to
    the residual (a post-norm family's post-norm output, bias-free by `read_weights`), whole layers
    and blocks are both. A mixture-of-experts family (ingest/families.py) defines head, group and attn
    units only: its MLP is routed experts, not one MLP (`moe_problem`).
    """
    if kind not in UNIT_KINDS:
        return f"{kind!r} is not a unit kind ({', '.join(UNIT_KINDS)})"
    if family in REFUSED:
        return f"{REFUSED[family]}, so {kind} units are not defined"
    if family not in FAMILIES and family not in ARCHITECTURES:
        return f"{family}: not a supported family, so {kind} units are not defined"
    return moe_problem(family, kind)


def check_units(w: Weights, units: list[Unit], condition: Unit | None = None) -> None:
    """Refuse units the model does not define, or one that overlaps its condition (ConfigError, one line)."""
    for unit in units + ([condition] if condition is not None else []):
        problem = unit_kind_problem(w.family.name, unit.kind)
        if problem:
            raise ConfigError(f"{unit.label}: {problem}")
        parse_unit(unit.canonical, w.n_layers, w.n_heads)  # the labels' range rule: out of range -> ConfigError
    if condition is not None:
        for unit in units:
            if unit.overlaps(condition, w.n_heads):
                raise ConfigError(f"{unit.label} overlaps its condition {condition.label}: "
                                  "a unit cannot be ablated on top of itself")


def replacement(kind: str, clean: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
    """What replaces an activation ([batch, pos, …]: a layer's z, an MLP's write) at every position.

    resample: the source row's clean value at the same position; mean: the mean over the
    batch's rows and positions; zero: 0.
    """
    if kind == "resample":
        return source
    if kind == "mean":
        return clean.mean(dim=(0, 1), keepdim=True).expand_as(clean)
    return clean.new_zeros(()).expand_as(clean)


replacement_z = replacement  # a layer's z [batch, pos, head, d_head] (the self-check's name)


def unit_patch(ctx, src, kind: str, unit: Unit, n_heads: int, cache: dict | None = None) -> E.Patch:
    """What ablating `unit` replaces, from the clean runs `ctx` and `src` (resample's source rows).

    `cache` keeps each layer's replacement across the units of a batch.
    """
    cache = {} if cache is None else cache

    def rep(what: str, layer: int) -> torch.Tensor:
        if (what, layer) not in cache:
            get = (lambda c: c.clean_z(layer)) if what == "z" else (lambda c: c.clean_mlp(layer))  # noqa: E731
            cache[what, layer] = replacement(kind, get(ctx), get(src) if src is not None else None)
        return cache[what, layer]

    heads: dict[int, dict[int, torch.Tensor]] = {}
    for layer, head in unit.heads(n_heads):
        heads.setdefault(layer, {})[head] = rep("z", layer)[:, :, head]
    return E.Patch(heads, {layer: rep("mlp", layer) for layer in unit.mlps()})


def _patched(base, ctx, src, kind: str, units: list[Unit], u: torch.Tensor, units_per_pass: int, n_heads: int):
    """Patch every unit on the baseline `base`, units of one first layer together, `units_per_pass` at a time.

    Yields:
        (chunk, result): the units of one pass and their `PatchResult`.
    """
    by_layer: dict[int, list[Unit]] = {}
    for unit in units:
        by_layer.setdefault(unit.layer, []).append(unit)
    cache: dict = {}
    for layer, layer_units in sorted(by_layer.items()):
        for start in range(0, len(layer_units), units_per_pass):
            chunk = layer_units[start:start + units_per_pass]
            patches = [unit_patch(ctx, src, kind, unit, n_heads, cache) for unit in chunk]
            yield chunk, base.patch(layer, patches, None, u)


def _baseline(ctx, src, kind: str, condition: Unit | None, n_heads: int):
    """The run every row is measured against: the clean one, or the condition-ablated one."""
    return ctx if condition is None else ctx.conditioned(unit_patch(ctx, src, kind, condition, n_heads))


class _Batch:
    """What every pass over one batch shares: targets, the baseline's logit, scale and component DEs,
    token indices, neuron DE units."""

    def __init__(self, base, rows: torch.Tensor, row0: int, w: Weights, condition: Unit | None):
        batch, seq = rows.shape
        self.base, self.w, self.condition = base, w, condition
        self.preds = preds = seq - 1
        y = rows.roll(-1, dims=1)  # [batch, pos]; the last position is a dummy, dropped below
        self.u = w.target_columns(y)
        self.logit = base.clean_logit(self.u)
        self.b_u = w.b_U[y]  # the stored logits carry the unembedding bias (tokens.logit)
        self.s = s = base.scale()
        self.token_index = ((row0 + np.arange(batch)[:, None]) * preds + np.arange(preds)[None, :]).reshape(-1)
        self.n = batch * preds
        # Each final-MLP neuron's DE per unit of activation: W_out[last, n] · u / s.
        self.wu = torch.einsum("nm,bpm->bpn", w.W_out_final, self.u.float())[:, :preds] / s[:, :preds, None].float()
        self.post_clean = base.post_final()[:, :preds].float()
        self._des = None

    def ident(self, unit: Unit) -> dict:
        """The columns that name a row's ablation: condition, unit, unit_kind, layer, head."""
        return {"condition": self.condition.label if self.condition is not None else "", "unit": unit.label,
                "unit_kind": unit.kind, "layer": unit.layer, "head": unit.head}

    def de_base(self, unit: Unit) -> torch.Tensor:
        """The unit's DE in the baseline run at its final-norm scale, [batch, pos]."""
        if self._des is None:
            self._des = self.base.component_des(self.u)
        de_h, de_m = self._des
        out = torch.zeros_like(self.s)
        for layer, head in unit.heads(self.w.n_heads):
            out = out + de_h[:, :, layer, head]
        for layer in unit.mlps():
            out = out + de_m[:, :, layer]
        return out

    def has_neurons(self, unit: Unit) -> bool:
        """Neuron rows need the final MLP's own write: none when the unit or its condition replaces it."""
        last = self.w.n_layers - 1
        return not any(last in x.mlps() for x in (unit, self.condition) if x is not None)

    def mask(self, tokens: np.ndarray | None) -> np.ndarray:
        return np.isin(self.token_index, tokens) if tokens is not None and len(tokens) else np.zeros(self.n, bool)

    def neurons(self, r: E.PatchResult, i: int, ident: dict, mask: np.ndarray, k: int):
        """Neuron rows and totals of unit `i` of a pass on the tokens in `mask` (float32 DEs, as stored)."""
        idx = np.nonzero(mask)[0]
        b, p = (torch.from_numpy(x).to(self.u.device) for x in (idx // self.preds, idx % self.preds))
        wu = self.wu[b, p]  # [tok, d_mlp]: only the tokens asked, never the whole batch per unit
        de_c = self.post_clean[b, p] * wu
        de_a = r.post_final[i, b, p].float() * wu
        return _neuron_rows(ident, self.token_index[mask], de_c, de_a, k)

    def condition_tokens(self) -> dict:
        """The baseline run's logit and final-norm scale per token, as `tokens` holds the clean run's:
        `condition_tokens`."""
        cut = lambda t: t[:, :self.preds].reshape(-1)  # noqa: E731
        out = {"condition": self.condition.label, "token_index": self.token_index,
               "logit": cut(self.logit + self.b_u), "ln_scale": cut(self.s)}
        output = self.base.output()
        if output is not None:  # the condition run's own loss and entropy, as `tokens` holds the clean run's
            out |= {"loss": cut(output.loss), "entropy": cut(output.entropy)}
        return out


def ablation_tables(
    ctx, src, kind: str, sample: int, units: list[Unit], rows: torch.Tensor,
    row0: int, top_sets: dict[str, np.ndarray], neurons_top_k: int,
    units_per_pass: int, w: Weights, on_pass: Callable[[int], None] = lambda n: None,
    attention_top_k: int = 8, condition: Unit | None = None, counterfactuals: tuple[str, ...] = (),
) -> dict[str, pa.Table]:
    """Ablate every unit in `units` on one batch (on top of `condition`, if any) and build the tables' rows.

    Args:
        ctx: FastBatch or ReferenceBatch over the batch's rows (clean).
        src: the same over the resample source rows (resample only), else None.
        kind: resample, mean or zero.
        sample: resample draw (0 for mean and zero).
        units: the units to ablate (`Unit`s; (layer, head) pairs are read as head units and give the
            tables without the unit columns, as before units).
        rows: token ids [batch, seq_len].
        row0: global index of the batch's first row.
        top_sets: each unit's top-p% token indices (global, sorted), keyed by `Unit.label`.
        neurons_top_k: final-MLP neurons kept at each end of the signed ranking, per unit and top token.
        units_per_pass: units batched into one patched pass (units of one first layer share passes).
        w: the model's processed weights (float32): structure, target columns, neuron DEs.
        on_pass: called with the number of unit-token ablations done after each pass.
        attention_top_k: attention sources kept per head unit and top token (0: none).
        condition: the unit ablated in every run, the baseline's too (`U | U0`), or None.
        counterfactuals: re-run each unit's top-p% tokens under these (ingest/counterfactual.py).

    Returns:
        Arrow tables `ablation_effects`, `ablation_top` (its rows on top-p% tokens), `repair_sources`,
        `neuron_effects`, `neuron_totals`, `attention_top`, `condition_tokens` under a condition, and
        `counterfactual_runs`, `counterfactual_sources` with counterfactuals.

    Raises:
        ConfigError: a unit the model does not define, or one that overlaps the condition.
    """
    check_units(w, units, condition)
    b = _Batch(_baseline(ctx, src, kind, condition, w.n_heads), rows, row0, w, condition)
    preds, n, token_index = b.preds, b.n, b.token_index
    eff, rep, neu, tot, top_masks, attention = [], [], [], [], [], []
    for chunk, r in _patched(b.base, ctx, src, kind, units, b.u, units_per_pass, w.n_heads):
        for i, unit in enumerate(chunk):
            cut = lambda t: t[i, :, :preds]  # noqa: E731 - [k, batch, pos, ...] -> [batch, preds, ...]
            ident = b.ident(unit)
            eff.append({
                **ident,
                "d_logit": (cut(r.logit) - b.logit[:, :preds]).reshape(-1),
                "ln_scale": cut(r.scale).reshape(-1),
                "de": cut(r.de).reshape(-1),
                "de_base": b.de_base(unit)[:, :preds].reshape(-1),
                "d_de_heads": cut(r.d_de_heads).sum((-1, -2)).reshape(-1),
                "d_de_mlps": cut(r.d_de_mlps).sum(-1).reshape(-1),
                **_metric_columns(r, cut),
            })
            mask = b.mask(top_sets.get(unit.label))
            top_masks.append(mask)
            if unit.kind == "head":
                attention.append((ident, mask))
            if not mask.any():
                continue
            sel = torch.from_numpy(np.nonzero(mask)[0]).to(b.u.device)
            rep.append(_repair_rows(w, unit, ident, token_index[mask],
                                    cut(r.d_de_heads).reshape(n, -1)[sel], cut(r.d_de_mlps).reshape(n, -1)[sel]))
            if neurons_top_k and b.has_neurons(unit):
                rows_, totals = b.neurons(r, i, ident, mask, neurons_top_k)
                neu.append(rows_)
                tot.append(totals)
        on_pass(len(chunk) * n)
    out = _assemble(kind, sample, token_index, eff, rep, neu, tot, top_masks)
    att = attention_rows(w, rows, row0, attention, token_index, attention_top_k, getattr(ctx, "clean", None))
    if att is not None:
        out["attention_top"] = _concat(att, kind, sample)
    if condition is not None:
        out["condition_tokens"] = _concat([b.condition_tokens()], kind, sample)
    if counterfactuals:
        out.update(_counterfactual_tables(b, ctx, src, kind, sample, units, top_sets, counterfactuals, w, row0,
                                          units_per_pass))
    return out


def _counterfactual_tables(b, ctx, src, kind, sample, units, top_sets, names, w, row0, units_per_pass) -> dict:
    """`counterfactual_runs` and `counterfactual_sources` of the batch (none when no unit has a top token here);
    units of one first layer share passes, `units_per_pass` at a time, each on its own rows
    (`counterfactual.batch_reruns`)."""
    from selfrepair.ingest.counterfactual import batch_reruns

    cache: dict = {}
    runs, sources = [], []
    for r in batch_reruns(w, b.base, units, top_sets, names,
                          lambda unit: unit_patch(ctx, src, kind, unit, w.n_heads, cache), b.u, row0, b.preds,
                          units_per_pass):
        r = r.finite()  # a token whose re-run overflowed float32 has no values to store (`UnitRerun.finite`)
        if not len(r.tokens):
            continue
        ident = {**b.ident(r.unit), "counterfactual": r.name}
        local = torch.as_tensor(r.tokens - row0 * b.preds, device=b.u.device)
        at = lambda t: t[:, :b.preds].reshape(-1)[local]  # noqa: E731 - [batch, pos] -> the unit's top tokens
        runs.append({**ident, "token_index": r.tokens, "d_logit": r.logit - at(b.logit), "ln_scale": r.ln_scale,
                     "de": r.de, "de_base": at(b.de_base(r.unit)), "d_de_heads": r.d_heads.sum(-1),
                     "d_de_mlps": r.d_mlps.sum(-1)})
        sources.append(_repair_rows(w, r.unit, ident, r.tokens, r.d_heads, r.d_mlps))
    if not runs:
        return {}
    return {"counterfactual_runs": _concat(runs, kind, sample), "counterfactual_sources": _concat(sources, kind, sample)}


def neuron_detail_tables(
    ctx, src, kind: str, sample: int, detail_sets: dict, rows: torch.Tensor,
    row0: int, neurons_top_k: int, units_per_pass: int, w: Weights,
    on_pass: Callable[[int], None] = lambda n: None, condition: Unit | None = None,
) -> dict[str, pa.Table]:
    """Neuron detail only, for extra tokens of some units (`--sr-mlps-neurons`): re-patch just those units.

    Args:
        ctx, src, kind, sample, rows, row0, units_per_pass, w, on_pass, condition: as `ablation_tables`.
        detail_sets: `Unit` -> the token indices (global, sorted) to store neuron rows for; units with an
            empty set, or that replace the final MLP, are not patched.
        neurons_top_k: as `ablation_tables` (positive).

    Returns:
        Arrow tables `neuron_effects` and `neuron_totals`; none when no unit has a token here (a shard
        that only supersedes stale detail).
    """
    sets = detail_sets
    check_units(w, list(sets), condition)
    neu, tot = [], []
    units = [unit for unit, toks in sets.items() if len(toks)]
    if units:
        b = _Batch(_baseline(ctx, src, kind, condition, w.n_heads), rows, row0, w, condition)
        units = sorted((unit for unit in units if b.has_neurons(unit)), key=lambda x: (x.layer, x.head, x.canonical))
        for chunk, r in _patched(b.base, ctx, src, kind, units, b.u, units_per_pass, w.n_heads):
            for i, unit in enumerate(chunk):
                rows_, totals = b.neurons(r, i, b.ident(unit), b.mask(sets[unit]), neurons_top_k)
                neu.append(rows_)
                tot.append(totals)
            on_pass(len(chunk) * b.n)
    if not neu:
        return {}
    return {"neuron_effects": _concat(neu, kind, sample), "neuron_totals": _concat(tot, kind, sample)}


def attention_rows(w, rows: torch.Tensor, row0: int, heads: list[tuple[dict, np.ndarray]], token_index, k: int,
                   clean: E.CleanState | None = None):
    """Per ablated head and top token, the k source positions with the largest clean attention weight.

    Args:
        heads: (row identity with `layer` and `head`, top-token mask) of each head unit.
        clean: the batch's clean run (the fast engine's), if there is one: see below.

    The clean patterns of the rows that hold a top token, at the layers asked; None when none of `heads`
    has a top token here. With `clean`, each layer asked runs alone on its stored input, up to its
    attention module (`counterfactual.clean_patterns`); without, one forward of the model with eager
    attention (whose attention modules return their probabilities) on those rows, up to the deepest
    layer asked (rows are independent; no unembedding).
    """
    if not k or not any(m.any() for _, m in heads):
        return None
    batch, seq = rows.shape
    preds = seq - 1
    wanted = [(ident, np.nonzero(mask)[0]) for ident, mask in heads if mask.any()]
    held = np.unique(np.concatenate([idx // preds for _, idx in wanted]))  # the rows that hold a top token
    layers = sorted({ident["layer"] for ident, _ in wanted})
    sel = torch.from_numpy(held).to(rows.device)
    if clean is not None:
        from selfrepair.ingest.counterfactual import clean_patterns

        patterns = clean_patterns(w, clean, rows, layers, sel)  # layer -> [held row, head, query, key]
    else:
        patterns = _forward_patterns(w, rows[sel], layers)
    parts = []
    for ident, idx in wanted:
        layer, head = ident["layer"], ident["head"]
        b, q = idx // preds, idx % preds
        at = torch.from_numpy(np.searchsorted(held, b))  # each token's row among the rows run
        p = patterns[layer][at, head, torch.from_numpy(q)].float()  # [n, seq] over keys
        kk = min(k, seq)
        weight, src = p.topk(kk, dim=-1)
        weight, src = weight.cpu().numpy(), src.cpu().numpy()
        rank = np.tile(np.arange(1, kk + 1, dtype=np.int16), (len(idx), 1))
        keep_ = src <= q[:, None]  # causal: a query sees positions up to its own
        parts.append({**ident, "token_index": np.repeat(token_index[idx], kk)[keep_.reshape(-1)],
                      "rank": rank[keep_], "src_pos": src[keep_].astype(np.int16),
                      "src_token_index": ((row0 + b[:, None]) * preds + src)[keep_].astype(np.int32),
                      "weight": weight[keep_]})
    return parts


def _forward_patterns(w, rows: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """`layers`' attention probabilities from one eager forward of `rows`, stopped after the deepest."""
    patterns: dict[int, torch.Tensor] = {}

    def keep(layer):
        def hook(module, args, out):
            patterns[layer] = out[1]
            if layer == layers[-1]:
                raise Stop  # nothing after the deepest layer asked is needed
        return hook

    from selfrepair.ingest.counterfactual import attention_implementation

    regs = [lambda l=l: E.attn_module(w, l).register_forward_hook(keep(l)) for l in layers]
    try:
        with torch.no_grad(), attention_implementation(w, "eager"), hooks(*regs):
            w.model(rows, use_cache=False)
    except Stop:
        pass
    return patterns


def repair_components(w: Weights, unit: Unit) -> tuple[list[tuple[int, int]], list[int]]:
    """The heads and MLPs outside `unit` whose DE can change when it is ablated (its pass's layers):
    heads after its first layer, MLPs from it (from the next in a parallel block)."""
    layer, mine_h, mine_m = unit.layer, set(unit.heads(w.n_heads)), set(unit.mlps())
    heads = [(l, h) for l in range(layer + 1, w.n_layers) for h in range(w.n_heads) if (l, h) not in mine_h]
    mlps = [l for l in range(layer + 1 if w.parallel else layer, w.n_layers) if l not in mine_m]
    return heads, mlps


def _repair_rows(w, unit: Unit, ident: dict, tokens, d_heads, d_mlps) -> dict:
    """Every downstream head and MLP outside the unit whose DE can change (`repair_components`)."""
    hl, ml = repair_components(w, unit)
    cols_h = [l * w.n_heads + h for l, h in hl]
    vals = torch.cat([d_heads[:, cols_h], d_mlps[:, ml]], 1).float().cpu().numpy()  # [tok, comp]
    head_kind, mlp_kind = SRC_KINDS
    kinds = np.array([head_kind] * len(hl) + [mlp_kind] * len(ml))
    src_layer = np.array([l for l, _ in hl] + ml, dtype=np.int16)
    src_head = np.array([h for _, h in hl] + [-1] * len(ml), dtype=np.int16)
    c = len(kinds)
    return {**ident, "token_index": np.repeat(tokens, c),
            "src_kind": np.tile(kinds, len(tokens)), "src_layer": np.tile(src_layer, len(tokens)),
            "src_head": np.tile(src_head, len(tokens)), "d_de": vals.reshape(-1)}


def _neuron_rows(ident: dict, tokens, de_c, de_a, k) -> tuple[dict, dict]:
    """The neuron rows whose signed ΔDE ranks in the top k or bottom k, and the per-token totals.

    Args:
        ident: the columns naming the ablation (`_Batch.ident`).
        tokens: global token indices [tok].
        de_c, de_a: each final-MLP neuron's baseline and ablated DE (float32) [tok, d_mlp].
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
    rows = {**ident, "token_index": np.repeat(tokens, kept),
            "neuron": idx.reshape(-1).cpu().numpy().astype(np.int32),
            "rank": np.tile(pos.cpu().numpy() + 1, len(tokens)).astype(np.int16),
            "de_clean": de_c.gather(1, idx).reshape(-1).cpu().numpy(),
            "de_ablated": de_a.gather(1, idx).reshape(-1).cpu().numpy()}
    d64 = d.double()  # sums over thousands of neurons: accumulate in float64, store float32
    totals = {**ident, "token_index": np.asarray(tokens),
              "d_de_sum": d64.sum(1).float().cpu().numpy(),
              "d_de_abs_sum": d64.abs().sum(1).float().cpu().numpy(),
              "d_de_pos_sum": d64.clamp(min=0).sum(1).float().cpu().numpy()}
    return rows, totals


def _concat(parts: list[dict], kind: str, sample: int) -> pa.Table:
    """Stack per-unit column dicts (scalars broadcast) and add the ablation and sample columns."""
    columns: dict[str, list[np.ndarray]] = {}
    for part in parts:
        n = next(len(v) for v in part.values() if not np.isscalar(v))
        for key, value in part.items():
            if isinstance(value, torch.Tensor):
                value = value.float().cpu().numpy()
            columns.setdefault(key, []).append(np.full(n, value, dtype=object if isinstance(value, str) else None)
                                               if np.isscalar(value) else value)
    data = {k: np.concatenate(v) for k, v in columns.items()}
    n = len(data["token_index"])
    data["ablation"] = np.full(n, kind, dtype=object)
    data["sample"] = np.full(n, sample, dtype=np.int16)
    return pa.table(data)


def _metric_columns(r: E.PatchResult, cut) -> dict:
    """The output-metric columns of one unit's rows (none when the run computes no metrics)."""
    if r.kl is None:
        return {}
    return {"d_loss": cut(r.d_loss).reshape(-1), "kl": cut(r.kl).reshape(-1),
            "d_entropy": cut(r.d_entropy).reshape(-1),
            "top1_changed": cut(r.top1_changed).reshape(-1).cpu().numpy().astype(bool)}


def _assemble(kind, sample, token_index, eff, rep, neu, tot, top_masks) -> dict[str, pa.Table]:
    for part in eff:
        part["token_index"] = token_index
    out = {"ablation_effects": _concat(eff, kind, sample)}
    # The rows of the units' top-p% tokens again, as their own small table (possibly empty):
    # per-unit questions on top tokens (Figure 1) read 2% of the rows instead of all.
    out["ablation_top"] = out["ablation_effects"].filter(pa.array(np.concatenate(top_masks)))
    if rep:
        out["repair_sources"] = _concat(rep, kind, sample)
    if neu:
        out["neuron_effects"] = _concat(neu, kind, sample)
        out["neuron_totals"] = _concat(tot, kind, sample)
    return out
