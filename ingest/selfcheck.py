"""Every ingest checks its own numbers on the first batch before anything is written.

Three comparisons, each a largest absolute deviation over the predictions of the batch's first
`CHECK_ROWS` rows:

- the engine's clean logit (from the residual, `u` and the final-norm scale) against the
  model's own unembedding output, centred over the vocabulary;
- the bridge (TransformerLens, processed weights) against the model: centred logits,
  and the engine's final-norm scale against `ln_final.hook_scale`;
- the fast engine against the reference engine (one hooked bridge forward per head) for
  ablated heads from the first, middle and last of their layers (and one unit of each other
  requested kind, alone and under each condition: `unit_cases`), each under one of the
  requested ablation types in turn, every type at least once (`check_plan`):
  d_logit, ablated scale, ablated head DE, d_de_heads and d_de_mlps; and its d_logit
  against a plain full forward of the Hugging Face model with the head's o_proj input
  patched; and (unless `--output-metrics none`) its d_loss, kl, d_entropy and top1_changed
  against full-vocabulary softmaxes of that forward's final logits and the baseline's. With a final logit softcap the bridge's logits are neither centred nor
  pre-softcap (TransformerLens disables center_unembed), so only the plain forward
  judges d_logit there.

With the paper preset's unfolded Llama weights (ingest/weights.py UNFOLDED) the stored
logit is the uncentred logit with the final norm's gain set to 1, which the components'
DEs sum to; "the model" is then the model run with that gain replaced by ones, and the
reference engine (whose logits are TransformerLens's gained, centred ones) judges the
ablated scale and DEs but not d_logit (the plain forward still does).

The model's own forward is the judge (`judge`). Beyond `TOLERANCE` (relative to the
quantity's own size) a comparison of the engine with the model's own forward refuses the
ingest with one line naming it. A comparison through the bridge or the reference engine
is excused, with a warning, when the bridge's own logits already disagree with the model
beyond the tolerance: the difference is TransformerLens's (e.g. Gemma 3's attention
softcap), and the engine matched the model. With a faithful bridge, a reference mismatch
still refuses. Every deviation is recorded in the manifest either way, the excused ones
named under `excused`.
"""

from __future__ import annotations

import contextlib

import torch

from selfrepair.errors import SelfCheckFailed, UnsupportedModel
from selfrepair.ingest.families import module_at
from selfrepair.ingest.weights import PROCESSED

TOLERANCE = 1e-3  # of max(1, largest |value|): float32 engines agree to ~1e-6


def _dev(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(largest |a − b|, the size it is judged against)."""
    a, b = a.float(), b.float()
    return float((a - b).abs().max()), max(1.0, float(b.abs().max()))


# Rows of the first batch the engines are compared on (with their resample source rows). One row is a
# real check (every position of a corpus row, its real resample source) at a fraction of a batch's cost:
# the self-check stays a small part of the run (issue 22: at most 10% of `make run`).
CHECK_ROWS = 1


def sample_heads(n_layers: int, n_heads: int, ablated=None) -> list[tuple[int, int]]:
    """One head each from the first, middle and last layers: of the model, or of `ablated` heads
    ((layer, head) pairs) when given, choosing among that layer's ablated heads (none: no head)."""
    if ablated is None:
        layers = sorted({0, n_layers // 2, n_layers - 1})
        return [(layer, (layer * 5 + 1) % n_heads) for layer in layers]
    ablated = sorted(set(ablated))
    layers = sorted({layer for layer, _ in ablated})
    if not layers:
        return []
    out = []
    for layer in sorted({layers[0], layers[len(layers) // 2], layers[-1]}):
        heads = [h for l, h in ablated if l == layer]
        preferred = (layer * 5 + 1) % n_heads
        out.append((layer, preferred if preferred in heads else heads[0]))
    return out


def check_plan(heads, cases, ablations) -> list[tuple[str, tuple]]:
    """The ablated comparisons to run, as (ablation type, item): each sample head ("head", (layer, head))
    and each unit case ("unit", (unit, condition)) once, with the ablation types in turn so that each
    type is checked at least once. A type only changes the replacement the engines are given, so
    checking every item under every type would repeat the same engine paths."""
    items = [("head", h) for h in heads] + [("unit", c) for c in cases]
    if not items:
        return []
    return [(ablations[i % len(ablations)], items[i % len(items)]) for i in range(max(len(items), len(ablations)))]


@contextlib.contextmanager
def unit_final_gain(w):
    """Under UNFOLDED, the model with its final norm's gain set to 1 (restored after); otherwise unchanged."""
    if w.convention == PROCESSED:
        yield
        return
    norm = module_at(w.model, w.family.final_norm)
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.nn.Parameter) or weight.shape != (w.d_model,):
        raise UnsupportedModel(f"{w.family.name}: the final norm has no [d_model] weight to set to 1")
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.fill_(1.0)
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def model_logit(w, raw: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The stored logit from the model's unembedding output: vocab-centred (PROCESSED) or raw (UNFOLDED)."""
    if w.convention == PROCESSED:
        raw = raw - raw.mean(-1, keepdim=True)
    return raw.gather(-1, y[..., None])[..., 0]


def full_forward_logit(w, rows: torch.Tensor, layer: int, head: int, z_new: torch.Tensor) -> torch.Tensor:
    """The ablated pre-softcap logit minus b_U from one whole forward of the model itself (centred, or under
    UNFOLDED uncentred with the final norm's gain set to 1)."""
    batch, pos = rows.shape

    def patch(module, args):
        x = args[0].clone()
        x.view(batch, pos, w.n_heads, w.d_head)[:, :, head] = z_new + w.c[layer, head]
        return (x, *args[1:])

    raw = {}
    hooks = [w.attn_out[layer].register_forward_pre_hook(patch),
             w.model.get_output_embeddings().register_forward_hook(lambda m, a, o: raw.__setitem__("r", o.float()))]
    try:
        with torch.no_grad(), unit_final_gain(w):
            w.model(rows, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    r = raw["r"].reshape(batch, pos, -1) * w.logit_scale
    y = rows.roll(-1, dims=1)
    return model_logit(w, r, y) - w.b_U[y]


# The comparisons judged by the model's own forward: never excused.
MODEL_JUDGED = ("clean logit: engine vs model", ": fast vs full model forward", ": cut re-run vs full model forward")
BRIDGE_VS_MODEL = "centred logits: bridge vs model"


def judge(family: str, out: dict[str, float], judged: dict[str, float]) -> list[str]:
    """Refuse on a deviation the model's own forward judges; excuse a bridge-only one (see the module doc).

    Args:
        family: the family's name, for the message.
        out: check -> largest deviation.
        judged: check -> the size the deviation is judged against.

    Returns:
        The checks beyond the tolerance that are excused (the bridge disagrees with the model).

    Raises:
        SelfCheckFailed: naming the worst deviation that is not excused.
    """
    over = {k for k in out if out[k] > TOLERANCE * judged[k]}
    bridge_off = BRIDGE_VS_MODEL in over
    excused = sorted(k for k in over if bridge_off and not any(m in k for m in MODEL_JUDGED))
    refused = over - set(excused)
    if refused:
        worst = max(refused, key=lambda k: out[k] / judged[k])
        raise SelfCheckFailed(
            f"self-check failed for {family}: {worst} differ by {out[worst]:.3g} "
            f"(tolerance {TOLERANCE * judged[worst]:.3g}); nothing was written"
        )
    return excused


def _merged(a, b):
    """One Patch making both `a`'s and `b`'s replacements (a condition and a unit share no component)."""
    from selfrepair.ingest.engine import Patch

    heads = {l: dict(v) for l, v in a.heads.items()}
    for l, v in b.heads.items():
        heads.setdefault(l, {}).update(v)
    return Patch(heads, {**a.mlps, **b.mlps})


def unit_cases(units, conditions, n_heads: int) -> list:
    """(unit, condition) pairs the self-check ablates besides its sample heads: the first unit of each
    other kind alone, and under each condition the first unit that shares no component with it."""
    first: dict = {}
    for unit in units:
        if unit.kind != "head":
            first.setdefault(unit.kind, unit)
    cases = [(unit, None) for unit in first.values()]
    for cond in conditions:
        unit = next((u for u in units if cond is not None and not u.overlaps(cond, n_heads)), None)
        if unit is not None:
            cases.append((unit, cond))
    return cases


def record_metrics(record, tag: str, rf, clean_logits: torch.Tensor, abl_logits: torch.Tensor, rows: torch.Tensor,
                   cut) -> None:
    """The fast engine's output metrics of one ablation (`rf`, the first unit of its pass) against full-vocabulary
    softmaxes of the model's own final logits, baseline and ablated (a whole forward with the ablation hooked in);
    top1_changed as the fraction of tokens that flip. Nothing when the run computes no metrics."""
    from selfrepair.ingest.output_metrics import full_metrics

    if rf.kl is None:
        return
    want = full_metrics(clean_logits, abl_logits, rows.roll(-1, dims=1))
    for name in ("d_loss", "kl", "d_entropy"):
        record(f"{name} {tag}: fast vs full model forward", cut(getattr(rf, name)[0]), cut(want[name]))
    flips = (cut(rf.top1_changed[0]) != cut(want["top1_changed"])).float().mean()
    record(f"top1_changed {tag}: fast vs full model forward", flips[None], torch.zeros(1))


def _unit_checks(record, w, rows, fast, fast_src, ref, ref_src, kind: str, cases, u_full, cut) -> None:
    """Each case's ablated logit against one whole forward of the model with the unit (and its condition)
    replaced by hooks; with a faithful bridge, its d_logit against the reference engine too."""
    from selfrepair.ingest.ablate import FastBatch, unit_patch

    for unit, cond in cases:
        tag = f"{kind} {unit.label}" + (f" | {cond.label}" if cond is not None else "")
        patch = unit_patch(fast, fast_src, kind, unit, w.n_heads)
        base, whole = fast, patch
        if cond is not None:
            cond_patch = unit_patch(fast, fast_src, kind, cond, w.n_heads)
            base, whole = fast.conditioned(cond_patch), _merged(cond_patch, patch)
        rf = base.patch(unit.layer, [patch], None, u_full)
        full = FastBatch(w, rows, base=whole)  # one forward of the model from its first layer
        record(f"ablated logit {tag}: fast vs full model forward", cut(rf.logit[0]), cut(full.clean_logit(u_full)))
        record_metrics(record, tag, rf, base.clean.logits, full.clean.logits, rows, cut)
        if ref is None or w.convention != PROCESSED or w.post_norm:
            continue
        rbase = ref if cond is None else ref.conditioned(unit_patch(ref, ref_src, kind, cond, w.n_heads))
        rr = rbase.patch(unit.layer, [unit_patch(ref, ref_src, kind, unit, w.n_heads)], None, u_full)
        record(f"d_logit {tag}: fast vs reference", cut(rf.logit[0] - base.clean_logit(u_full)),
               cut(rr.logit[0] - rbase.clean_logit(u_full)))


def run_self_check(model, w, rows: torch.Tensor, source_rows: torch.Tensor | None, ablations,
                   cases=(), log=print, heads=None, progress=None, counterfactuals=(),
                   metrics: bool = True) -> tuple[dict, list[str]]:
    """Compare engine, bridge and model on one batch.

    Returns:
        ({check: deviation}, the checks beyond the tolerance excused by `judge`).

    Args:
        model: the LoadedModel (bridge and Hugging Face model).
        w: the fast engine's processed weights.
        rows: the first batch's token ids [batch, seq_len]; its first CHECK_ROWS rows are checked.
        source_rows: that batch's resample source rows (None without resample); those of the checked rows are used.
        ablations: the ablation types the ingest will run.
        cases: (unit, condition) pairs to check besides the sample heads (`unit_cases`).
        heads: the sample heads (default: `sample_heads` of the whole model).
        progress: called with 1 after each step (`check_steps` of them).
        counterfactuals: re-runs to check against a whole hooked forward (ingest/counterfactual_check.py).
        metrics: whether the run computes the output metrics (then checked against full softmaxes too).

    Raises:
        SelfCheckFailed: a deviation beyond TOLERANCE, named in the message.
    """
    from selfrepair.ingest.ablate import FastBatch, ReferenceBatch, replacement_z
    from selfrepair.ingest.engine import Patch

    step = progress or (lambda n: None)
    heads = sample_heads(w.n_layers, w.n_heads) if heads is None else heads
    rows = rows[:CHECK_ROWS]
    preds = rows.shape[1] - 1
    cut = lambda t: t[..., :preds]  # noqa: E731
    y = rows[:, 1:]
    out: dict[str, float] = {}
    judged: dict[str, float] = {}

    def record(name, a, b):
        out[name], judged[name] = _dev(a, b)

    fast = FastBatch(w, rows, metrics=metrics)
    st = fast.clean
    u_full = w.target_columns(rows.roll(-1, dims=1))
    engine_logit = cut(fast.clean_logit(u_full)) + w.b_U[y]
    if w.convention == PROCESSED:
        raw = st.raw_logits[:, :preds]
    else:  # the logit Σ DE sums to: the model's own forward with its final norm's gain set to 1
        with torch.no_grad(), unit_final_gain(w):
            raw = w.model(rows, use_cache=False).logits.float()[:, :preds]
    record("clean logit: engine vs model", engine_logit, model_logit(w, raw, y))
    bridge = model.bridge  # None when TransformerLens cannot wrap the model: the model's own forward judges
    use_ref = bridge is not None and not w.softcap
    ref = ReferenceBatch(bridge, rows) if use_ref else None
    if bridge is not None:
        if ref is not None:  # its clean forward already holds the logits and the final-norm scale
            b_logits, b_scale = ref.logits, ref.scale()
        else:
            with torch.no_grad():
                b_logits, cache = bridge.run_with_cache(rows, names_filter=lambda n: n == "ln_final.hook_scale")
            b_scale = cache["ln_final.hook_scale"][..., 0]
        hf = st.logits
        record("centred logits: bridge vs model", b_logits.float() - b_logits.float().mean(-1, keepdim=True),
               hf - hf.mean(-1, keepdim=True))
        record("final-norm scale: engine vs bridge", st.scale, b_scale.float())
    fast_src = FastBatch(w, source_rows[:CHECK_ROWS]) if source_rows is not None else None
    ref_src = ReferenceBatch(bridge, source_rows[:CHECK_ROWS]) if use_ref and source_rows is not None else None
    cf = fast.clean_logit(u_full)
    cr = ref.clean_logit(u_full) if use_ref else None
    step(1)
    for kind, (what, item) in check_plan(heads, cases, list(ablations)):
        if what == "unit":
            _unit_checks(record, w, rows, fast, fast_src, ref, ref_src, kind, [item], u_full, cut)
            step(1)
            continue
        layer, head = item
        tag = f"{kind} L{layer}H{head}"
        z = replacement_z(kind, fast.clean_z(layer), fast_src.clean_z(layer) if fast_src is not None else None)
        rf = fast.patch(layer, [head], z[:, :, [head]].permute(2, 0, 1, 3), u_full)
        record(f"ablated logit {tag}: fast vs full model forward", cut(rf.logit[0]),
               cut(full_forward_logit(w, rows, layer, head, z[:, :, head])))
        if rf.kl is not None:  # the ablated run's final logits: the model's own forward, the head's z hooked
            whole = FastBatch(w, rows, base=Patch({layer: {head: z[:, :, head]}}), metrics=False)
            record_metrics(record, tag, rf, st.logits, whole.clean.logits, rows, cut)
        if use_ref:
            zr = replacement_z(kind, ref.clean_z(layer), ref_src.clean_z(layer) if ref_src is not None else None)
            rr = ref.patch(layer, [head], zr[:, :, [head]].permute(2, 0, 1, 3), u_full)
            if w.convention == PROCESSED:  # the bridge's logits are processed (gained, centred) ones
                record(f"d_logit {tag}: fast vs reference", cut(rf.logit[0] - cf), cut(rr.logit[0] - cr))
            record(f"ablated scale {tag}: fast vs reference", cut(rf.scale[0]), cut(rr.scale[0]))
            if not w.post_norm:  # the bridge's hooks do not model post-norm head writes
                record(f"ablated DE {tag}: fast vs reference", cut(rf.de_head[0]), cut(rr.de_head[0]))
                record(f"d_de_heads {tag}: fast vs reference", rf.d_de_heads[0].sum((-1, -2))[:, :preds],
                       rr.d_de_heads[0].sum((-1, -2))[:, :preds])
                record(f"d_de_mlps {tag}: fast vs reference", rf.d_de_mlps[0].sum(-1)[:, :preds],
                       rr.d_de_mlps[0].sum(-1)[:, :preds])
        step(1)
    if counterfactuals and heads:
        from selfrepair.ingest.counterfactual_check import counterfactual_checks

        counterfactual_checks(record, w, rows, fast, fast_src, ablations[0], counterfactuals, *heads[0], u_full)
    return out, judge(w.family.name, out, judged)


def check_steps(heads, cases, ablations) -> int:
    """The steps `run_self_check` reports to `progress`: the clean comparisons, then each planned ablation."""
    return 1 + len(check_plan(heads, cases, list(ablations)))
