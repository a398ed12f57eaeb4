"""Units (heads, head groups, ATTNn, MLPn, BLOCKn) and conditions in both engines, against plain transformers.

The recomputation here uses the Hugging Face model and hooks only (no selfrepair code; weights
and conventions as tests/recompute.py reads them): a head is ablated by writing its slice of
the attention output projection's input (processed z plus the folded value bias c_h), an MLP
by replacing its down projection's output (its write to the residual), and everything
downstream is the model's own forward. A conditioned unit `U | U0` is measured against the
U0-ablated run. Tiny GPT-2 (sequential), GPT-NeoX (parallel) and Llama (RMSNorm, GQA) models
with perturbed biases and gains; every table is built once per module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import recompute as R
from selfrepair.errors import ConfigError
from selfrepair.ingest.ablate import (FastBatch, ReferenceBatch, ablation_tables, check_units,
                                      neuron_detail_tables, unit_kind_problem, unit_patch)
from selfrepair.ingest.clean import run_clean
from selfrepair.ingest.models import load_model
from selfrepair.ingest.weights import read_weights
from selfrepair.store.labels import parse_unit

FAMILIES = ("gpt2", "neox", "llama")
KINDS = ("resample", "mean", "zero")
BATCH, SEQ = 3, 16
TOL = 1e-4
UNITS = ["MLP0", "MLP1", "BLOCK0", "BLOCK1", "ATTN0", "ATTN1", "L1H3", "L0H1+L1H2", "L0H0+L0H1+L0H2+L0H3",
         "L0H2", "L1H0+L1H1"]
# condition -> units ablated on top of it (none overlapping it)
# (MLP0 after ATTN0 in a sequential block, MLP1 after every layer-0 unit: a condition downstream of its unit)
CONDITIONED = {"L0H1": ["MLP0", "BLOCK1", "L1H0+L1H2", "L0H2", "MLP1", "ATTN1"], "MLP0": ["ATTN1", "L0H3", "ATTN0"],
               "MLP1": ["L0H0+L1H1", "BLOCK0"]}
FLOATS = ("d_logit", "ln_scale", "de", "de_base", "d_de_heads", "d_de_mlps")


def _rows(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, 256, (BATCH, SEQ), generator=g)
    rows[:, 0] = 256  # BOS
    return rows


PAIR = torch.tensor([2, 0, 1])  # resample: row r takes row PAIR[r]'s values


def _unembed_bias(w) -> np.ndarray:
    """b_U of each prediction's correct token, in token_index order: condition_tokens.logit, like
    tokens.logit, carries it."""
    return w.b_U[_rows().roll(-1, dims=1)][:, :SEQ - 1].reshape(-1).double().numpy()


# -- the plain-transformers recomputation --------------------------------------------------------------
@torch.no_grad()
def _hf_run(m: R.Model, rows, z_set: dict, mlp_set: dict) -> dict:
    """One forward of the HF model; z_set {layer: {head: HF z [row, seq, d_head]}} written into the output
    projection's input, mlp_set {layer: [row, seq, d_model]} replacing the MLP's output."""
    got, hooks = {"z": {}, "mlp": {}}, []
    H, dh = m.n_heads, m.d_head
    for l, layer in enumerate(m.layers):
        def o_pre(mod, args, l=l):
            x = args[0].clone()
            view = x.view(*x.shape[:-1], H, dh)
            for h, value in z_set.get(l, {}).items():
                view[..., h, :] = value
            got["z"][l] = view.clone()
            return (x, *args[1:])

        def mlp_fwd(mod, args, out, l=l):
            o = out[0] if isinstance(out, tuple) else out
            if l in mlp_set:
                o = mlp_set[l].to(o.dtype).reshape(o.shape).clone()
            got["mlp"][l] = o.clone().reshape(*rows.shape, -1)
            return (o, *out[1:]) if isinstance(out, tuple) else o
        hooks.append(R._get(layer, m.spec.o_proj).register_forward_pre_hook(o_pre))
        hooks.append(R._get(layer, m.spec.mlp_out).register_forward_hook(mlp_fwd))
        if m.spec.attn_post:  # the attention post-norm's input: its scale divides every head's write
            hooks.append(m.attn_post[l].register_forward_pre_hook(
                lambda mod, args, l=l: got.setdefault("post_in", {}).__setitem__(l, args[0].clone())))

    def h0_pre(mod, args, kwargs):
        got["h0"] = (args[0] if args else kwargs["hidden_states"]).clone()
    hooks.append(m.layers[0].register_forward_pre_hook(h0_pre, with_kwargs=True))
    hooks.append(m.final_norm.register_forward_pre_hook(lambda mod, args: got.__setitem__("x", args[0].clone())))
    try:
        m.hf(input_ids=rows, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return got


class Recompute:
    """Clean run, replacement values and ablated runs of one batch, in HF coordinates (float64 results)."""

    def __init__(self, hf, rows):
        self.m = m = R.Model(hf)
        self.rows = rows
        zr = R.run(m, rows[:1, :2], zero_layer_inputs=True)
        self.c = [zr.z[l][0, 0] for l in range(m.n_layers)]  # [H, d_head]: the folded value bias
        self.clean = _hf_run(m, rows, {}, {})
        self.u = m.u(rows[:, 1:].reshape(-1))  # [N, d]

    def values(self, kind: str, unit) -> tuple[dict, dict]:
        """The unit's replacements (HF z and MLP writes) from the clean run."""
        z_set, mlp_set = {}, {}
        for l, h in unit.heads(self.m.n_heads):
            z = self.clean["z"][l][:, :, h]
            new = (z[PAIR] if kind == "resample" else z.double().mean((0, 1)).float().expand_as(z)
                   if kind == "mean" else self.c[l][h].float().expand_as(z))
            z_set.setdefault(l, {})[h] = new
        for l in unit.mlps():
            w_ = self.clean["mlp"][l]
            mlp_set[l] = (w_[PAIR] if kind == "resample" else
                          w_.double().mean((0, 1)).float().expand_as(w_) if kind == "mean" else torch.zeros_like(w_))
        return z_set, mlp_set

    def run(self, kind: str, *units) -> dict:
        z_set, mlp_set = {}, {}
        for unit in units:
            z, mlp = self.values(kind, unit)
            for l, heads in z.items():
                z_set.setdefault(l, {}).update(heads)
            mlp_set.update(mlp)
        return _hf_run(self.m, self.rows, z_set, mlp_set)

    def des(self, run: dict, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every head's [layer, head, N] and MLP's [layer, N] DE in `run` at scale s (processed z)."""
        m, u = self.m, self.u
        heads = []
        for l in range(m.n_layers):
            zp = R._pred(run["z"][l]) - self.c[l].double()
            if m.spec.attn_post:  # a head writes g_post ⊙ (z W_O) / s_post, s_post of the same run
                s_post = R._scale(R._pred(run["post_in"][l].reshape(*self.rows.shape, -1)), m.spec.post_norm,
                                  m.post_eps[l])
                heads.append(torch.einsum("nhk,hkd,nd->hn", zp, m.W_O[l], u * m.g_post[l]) / s_post)
            else:
                heads.append(torch.einsum("nhk,hkd,nd->hn", zp, m.W_O[l], u))
        heads = torch.stack(heads) / s
        mlps = torch.stack([(R._pred(run["mlp"][l]) * u).sum(-1) for l in range(m.n_layers)]) / s
        return heads, mlps

    def scale(self, run: dict) -> torch.Tensor:
        return R._scale(R._pred(run["x"]), self.m.spec.norm, self.m.norm_eps)

    def logit(self, run: dict) -> torch.Tensor:
        """Centred logit minus b_U, as the engine's tables hold it."""
        return (R._pred(run["x"]) * self.u).sum(-1) / self.scale(run)

    def rows_for(self, kind: str, unit, condition=None) -> dict[str, np.ndarray]:
        """The ablation_effects columns of `unit` (on top of `condition`) by DESIGN.md's definitions."""
        base = self.clean if condition is None else self.run(kind, condition)
        abl = self.run(kind, unit, *([condition] if condition is not None else []))
        s_b = self.scale(base)
        bh, bm = self.des(base, s_b)
        ah, am = self.des(abl, s_b)
        mine_h, mine_m = torch.zeros_like(bh, dtype=torch.bool), torch.zeros_like(bm, dtype=torch.bool)
        for l, h in unit.heads(self.m.n_heads):
            mine_h[l, h] = True
        for l in unit.mlps():
            mine_m[l] = True
        out = {"d_logit": self.logit(abl) - self.logit(base), "ln_scale": self.scale(abl),
               "de": (ah * mine_h).sum((0, 1)) + (am * mine_m).sum(0),
               "de_base": (bh * mine_h).sum((0, 1)) + (bm * mine_m).sum(0),
               "d_de_heads": ((ah - bh) * ~mine_h).sum((0, 1)), "d_de_mlps": ((am - bm) * ~mine_m).sum(0)}
        return {k: v.numpy() for k, v in out.items()}


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded(tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    out = {}
    for family in FAMILIES:
        lm = load_model(str(tiny_model_dirs[family]))
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family]).float().eval()
        out[family] = (read_weights(lm.hf_model, SEQ), lm.bridge, Recompute(plain, _rows()))
    return out


# Detail tokens: never position 0, where every row holds BOS, so resampling changes nothing there and
# the neurons' ranking by their (zero) change would be rounding noise.
TOP = np.array([t for t in range(1, BATCH * (SEQ - 1), 4) if t % (SEQ - 1)])


def _tables(ctx, src, kind, units, w, condition=None, per_pass=3, top=None):
    top = top if top is not None else {u.label: TOP for u in units}
    return ablation_tables(ctx, src if kind == "resample" else None, kind, 0, units, _rows(), 0, top, 3, per_pass,
                           w, attention_top_k=2, condition=condition)


def _units(labels, w):
    return [parse_unit(x, w.n_layers, w.n_heads) for x in labels]


@pytest.fixture(scope="module")
def tables(loaded):
    """family -> engine -> kind -> condition label ("" none) -> tables."""
    out = {}
    for family, (w, bridge, _) in loaded.items():
        rows = _rows()
        engines = {"fast": (FastBatch(w, rows), FastBatch(w, rows[PAIR])),
                   "reference": (ReferenceBatch(bridge, rows), ReferenceBatch(bridge, rows[PAIR])),
                   "bfloat16": (FastBatch(w, rows, torch.bfloat16), FastBatch(w, rows[PAIR], torch.bfloat16))}
        for engine, (ctx, src) in engines.items():
            for kind in KINDS:
                got = out.setdefault(family, {}).setdefault(engine, {}).setdefault(kind, {})
                got[""] = _tables(ctx, src, kind, _units(UNITS, w), w)
                for cond, labels in CONDITIONED.items():
                    got[cond] = _tables(ctx, src, kind, _units(labels, w), w, parse_unit(cond))
    return out


def _effects(t, label: str) -> dict[str, np.ndarray]:
    eff = t["ablation_effects"].to_pandas()
    eff = eff[eff["unit"] == label].sort_values("token_index")
    assert len(eff) == BATCH * (SEQ - 1), label
    return {c: eff[c].to_numpy() for c in eff.columns}


def _cases():
    yield "", UNITS
    yield from CONDITIONED.items()


# -- against plain transformers --------------------------------------------------------------------
DEVIATIONS: dict = {}


@pytest.mark.parametrize("family", FAMILIES)
def test_units_equal_plain_transformers(loaded, tables, family):
    w, _, rc = loaded[family]
    worst: dict = {}
    for kind in KINDS:
        for cond, labels in _cases():
            condition = parse_unit(cond) if cond else None
            for unit in _units(labels, w):
                want = rc.rows_for(kind, unit, condition)
                got = _effects(tables[family]["fast"][kind][cond], unit.label)
                for col in FLOATS:
                    if col == "ln_scale":
                        dev = np.abs(got[col] - want[col]).max() / np.abs(want[col]).min()
                        assert dev < 1e-5, (kind, cond, unit.label, col)
                    else:
                        dev = np.abs(got[col] - want[col]).max()
                        assert dev < TOL, (kind, cond, unit.label, col, dev)
                        key = unit.kind + (" | cond" if cond else "")
                        worst[key] = max(worst.get(key, 0.0), float(dev))
                assert (got["layer"] == unit.layer).all() and (got["head"] == unit.head).all()
                assert (got["condition"] == cond).all() and (got["unit_kind"] == unit.kind).all()
                # the ablation really moves things downstream (the comparison is not 0 = 0)
                if unit.last_layer() == 0 and not cond.startswith("MLP"):
                    assert np.abs(want["d_de_mlps"]).max() > 1e-2, (kind, unit.label)
    DEVIATIONS[family] = worst
    print(f"\n{family}: largest |fast - plain transformers| per unit kind: "
          + ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items())))


@pytest.mark.parametrize("family", FAMILIES)
def test_condition_tokens_are_the_condition_ablated_run(loaded, tables, family):
    w, _, rc = loaded[family]
    for kind in KINDS:
        for cond in CONDITIONED:
            base = rc.run(kind, parse_unit(cond))
            ct = tables[family]["fast"][kind][cond]["condition_tokens"].to_pandas().sort_values("token_index")
            assert (ct["condition"] == cond).all() and (ct["ablation"] == kind).all()
            assert np.abs(ct["logit"].to_numpy() - _unembed_bias(w) - rc.logit(base).numpy()).max() < TOL
            assert np.abs(ct["ln_scale"].to_numpy() / rc.scale(base).numpy() - 1).max() < 1e-5
        assert "condition_tokens" not in tables[family]["fast"][kind][""]


# -- the engines against each other and the identities ---------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_engine_equals_reference_for_every_kind(tables, family):
    for kind in KINDS:
        for cond, labels in _cases():
            fast, ref = tables[family]["fast"][kind][cond], tables[family]["reference"][kind][cond]
            assert set(fast) == set(ref)
            for name in fast:
                a, b = fast[name].to_pandas(), ref[name].to_pandas()
                key = [c for c in ("unit", "token_index", "src_kind", "src_layer", "src_head", "neuron", "rank")
                       if c in a.columns]
                if name == "neuron_effects":  # near-ties may swap ranks: compare the sorted values per token
                    key = ["unit", "token_index"]
                    a, b = (x.groupby(key)["de_ablated"].apply(sorted).explode().reset_index() for x in (a, b))
                a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
                assert len(a) == len(b) > 0 and a[key].equals(b[key]), (kind, cond, name)
                for col in a.columns:
                    if a[col].dtype.kind == "f" or name == "neuron_effects" and col == "de_ablated":
                        x, y = a[col].to_numpy(float), b[col].to_numpy(float)
                        err = np.abs(x - y).max() / (np.abs(y).min() if col == "ln_scale" else 1)
                        assert err < (1e-5 if col == "ln_scale" else TOL), (kind, cond, name, col, err)


def _identity_errors(t, baseline_logit, baseline_scale) -> float:
    """Largest error of DESIGN.md's sr_ln closed form on every row of `ablation_effects`."""
    eff = t["ablation_effects"].to_pandas()
    idx = eff["token_index"].to_numpy()
    lb, sb = baseline_logit[idx], baseline_scale[idx]
    d = {c: eff[c].to_numpy(np.float64) for c in FLOATS}
    sr_ln = d["d_logit"] - (d["de"] - d["de_base"]) - d["d_de_heads"] - d["d_de_mlps"]
    closed = (sb / d["ln_scale"] - 1) * (lb + d["d_logit"]) * d["ln_scale"] / sb
    assert np.abs(closed).max() > 100 * TOL  # the norm's scale really moves
    return float(np.abs(sr_ln - closed).max())


@pytest.mark.parametrize("engine", ["fast", "reference", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_identities_hold_for_every_kind(loaded, tables, family, engine):
    """Σ DE = logit − b_U in the condition-ablated baseline (the store's own clean decomposition of that
    run), and the sr_ln closed form on every row, measured against the baseline it names."""
    w, _, _ = loaded[family]
    rows = _rows()
    ctx = FastBatch(w, rows)
    preds = SEQ - 1
    u = w.target_columns(rows.roll(-1, dims=1))
    clean_logit = ctx.clean_logit(u)[:, :preds].reshape(-1).double().numpy()
    clean_scale = ctx.scale()[:, :preds].reshape(-1).double().numpy()
    for kind in KINDS:
        for cond, labels in _cases():
            t = tables[family][engine][kind][cond]
            if cond:
                ct = t["condition_tokens"].to_pandas().sort_values("token_index")
                lb, sb = ct["logit"].to_numpy(np.float64) - _unembed_bias(w), ct["ln_scale"].to_numpy(np.float64)
                if engine == "fast":  # Σ DE in the baseline: tokens, head_effects, mlp_effects of that run
                    base = ctx.conditioned(unit_patch(ctx, FastBatch(w, rows[PAIR]), kind, parse_unit(cond), w.n_heads))
                    out = run_clean(w, rows, 0, lambda ids: [""] * len(ids), False, state=base.clean).tables
                    tok = out["tokens"].to_pandas()
                    de_sum = (out["head_effects"].to_pandas().groupby("token_index")["de"].sum().to_numpy(np.float64)
                              + out["mlp_effects"].to_pandas().groupby("token_index")["de"].sum().to_numpy(np.float64)
                              + tok["de_other"].to_numpy(np.float64))
                    assert np.abs(de_sum - (tok["logit"] - tok["unembed_bias"]).to_numpy()).max() < TOL
                    assert np.abs(lb - (tok["logit"] - tok["unembed_bias"]).to_numpy()).max() < 1e-5
                    heads = out["head_effects"].to_pandas()
                    for unit in _units(labels, w):  # de_base is the unit's DE in that run
                        want = sum(heads[(heads["layer"] == l) & (heads["head"] == h)].sort_values("token_index")["de"]
                                   .to_numpy(np.float64) for l, h in unit.heads(w.n_heads))
                        if unit.heads(w.n_heads) and not unit.mlps():
                            assert np.abs(_effects(t, unit.label)["de_base"] - want).max() < TOL
            else:
                lb, sb = clean_logit, clean_scale
            assert _identity_errors(t, lb, sb) < TOL, (kind, cond)


def test_low_precision_error_is_small(tables):
    """bfloat16 (only the matrix products, on the change from the baseline) stays close to float32 for
    every kind, the conditioned ones too."""
    for family in FAMILIES:
        for col in ("d_logit", "d_de_heads", "d_de_mlps"):
            a, b = [], []
            for kind in KINDS:
                for cond, _ in _cases():
                    key = ["unit", "token_index"]
                    for out, engine in ((a, "fast"), (b, "bfloat16")):
                        out.append(tables[family][engine][kind][cond]["ablation_effects"].to_pandas()
                                   .sort_values(key)[col])
            a, b = np.concatenate(a), np.concatenate(b)
            rel = np.abs(b - a).mean() / np.abs(a).mean()
            assert rel <= 0.02 and not np.array_equal(a, b), (family, col, rel)


# -- the unit kinds' rows --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_attn_equals_the_group_of_its_heads(tables, family):
    for kind in KINDS:
        t = tables[family]["fast"][kind][""]
        a, g = _effects(t, "ATTN0"), _effects(t, "L0H0+L0H1+L0H2+L0H3")
        assert (a["head"] == -1).all() and (g["unit_kind"] == "group").all() and (a["unit_kind"] == "attn").all()
        for col in FLOATS:
            np.testing.assert_allclose(a[col], g[col], rtol=0, atol=1e-6, err_msg=col)
        rep = t["repair_sources"].to_pandas()
        key = ["token_index", "src_kind", "src_layer", "src_head"]
        ra = rep[rep.unit == "ATTN0"].sort_values(key).reset_index(drop=True)
        rg = rep[rep.unit == "L0H0+L0H1+L0H2+L0H3"].sort_values(key).reset_index(drop=True)
        assert len(ra) > 0 and ra[key].equals(rg[key])
        np.testing.assert_allclose(ra["d_de"], rg["d_de"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_repair_sources_sum_to_the_breakdown_and_exclude_the_unit(loaded, tables, family):
    w = loaded[family][0]
    for kind in KINDS:
        for cond, labels in _cases():
            t = tables[family]["fast"][kind][cond]
            rep, eff = t["repair_sources"].to_pandas(), t["ablation_effects"].to_pandas()
            for unit in _units(labels, w):
                mine = rep[rep.unit == unit.label]
                comps = set(zip(mine.src_kind, mine.src_layer, mine.src_head))
                assert not comps & {("head", l, h) for l, h in unit.heads(w.n_heads)}
                assert not comps & {("mlp", l, -1) for l in unit.mlps()}
                if not len(mine):
                    continue  # nothing downstream (a parallel family's last layer)
                sums = mine.groupby(["token_index", "src_kind"])["d_de"].sum().unstack(fill_value=0.0)
                e = eff[eff.unit == unit.label].set_index("token_index").loc[sums.index]
                for src, col in (("head", "d_de_heads"), ("mlp", "d_de_mlps")):
                    got = sums[src].to_numpy() if src in sums else 0.0
                    assert np.abs(got - e[col].to_numpy()).max() < TOL, (kind, cond, unit.label, src)


def test_neuron_and_attention_rows_follow_the_unit_kind(loaded, tables):
    w = loaded["gpt2"][0]
    t = tables["gpt2"]["fast"]["zero"][""]
    last = w.n_layers - 1
    neurons = set(t["neuron_effects"].to_pandas()["unit"])
    totals = set(t["neuron_totals"].to_pandas()["unit"])
    want = {x for x in UNITS if last not in parse_unit(x).mlps()}
    assert neurons == totals == want and f"MLP{last}" not in neurons and f"BLOCK{last}" not in neurons
    attention = t["attention_top"].to_pandas()
    assert set(attention["unit"]) == {x for x in UNITS if parse_unit(x).kind == "head"}
    assert (attention["unit_kind"] == "head").all()
    # a condition that replaces the final MLP leaves no neuron rows either
    rows = _rows()
    got = _tables(FastBatch(w, rows), None, "zero", _units(["L0H0", "ATTN0"], w), w, parse_unit(f"MLP{last}"))
    assert "neuron_effects" not in got and set(got["condition_tokens"].column_names) >= {"logit", "ln_scale"}


def test_neuron_detail_tables_match_the_ablation_tables(loaded, tables):
    w = loaded["llama"][0]
    rows = _rows()
    ctx, src = FastBatch(w, rows), FastBatch(w, rows[PAIR])
    units = _units(["MLP0", "L0H1+L1H2", "ATTN1", "MLP1"], w)
    toks = TOP
    for cond in ("", "L0H0"):
        condition = parse_unit(cond) if cond else None
        got = neuron_detail_tables(ctx, src, "resample", 0, {u: toks for u in units}, rows, 0, 3, 2, w,
                                   condition=condition)
        full = _tables(ctx, src, "resample", units, w, condition)
        for name in ("neuron_effects", "neuron_totals"):
            key = ["unit", "token_index"] + (["rank"] if name == "neuron_effects" else [])
            a = got[name].to_pandas().sort_values(key).reset_index(drop=True)
            b = full[name].to_pandas().sort_values(key).reset_index(drop=True)
            assert set(a["unit"]) == {"MLP0", "L0H1+L1H2", "ATTN1"} and (a["condition"] == cond).all()
            assert a[b.columns].equals(b)


# -- refusals ------------------------------------------------------------------------------------------
def test_a_unit_overlapping_its_condition_is_refused(loaded):
    w = loaded["gpt2"][0]
    for unit, cond in (("ATTN0", "L0H1"), ("BLOCK1", "MLP1"), ("L0H1+L1H2", "L1H2"), ("L0H1", "L0H1")):
        with pytest.raises(ConfigError, match=f"overlaps its condition {cond}") as e:
            check_units(w, [parse_unit(unit)], parse_unit(cond))
        assert "\n" not in str(e.value)
    check_units(w, [parse_unit("ATTN1")], parse_unit("MLP1"))  # disjoint: fine


def test_unit_kind_problem_names_family_and_kind():
    for family in ("GPT-2", "Gemma 2", "OLMo 2", "Gemma2ForCausalLM"):
        for kind in ("head", "group", "attn", "mlp", "block"):
            assert unit_kind_problem(family, kind) is None
    problem = unit_kind_problem("MixtralForCausalLM", "mlp")
    assert problem.startswith("Mixtral") and "mlp units" in problem
    assert "neuron" in unit_kind_problem("GPT-2", "neuron")


# -- every other family: quirks of where a head and an MLP write --------------------------------------
OTHER_FAMILIES = ("gemma2", "olmo2", "gemma3", "falcon", "bloom", "opt", "phi", "gptj", "cohere", "gptneo",
                  "gptbigcode", "qwen2", "qwen3", "mistral", "stablelm", "gemma", "phi3", "olmo")
OTHER_UNITS = {"": ["MLP1", "BLOCK0", "L0H1+L2H0", "ATTN2", "MLP2"], "L0H2": ["MLP1", "BLOCK2", "L1H0+L2H3"],
               "MLP1": ["L0H0", "ATTN2"]}


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_other_families_equal_plain_transformers(family):
    """Post-norm blocks (Gemma 2/3, OLMo 2: an MLP's write is its post-norm's output, a head's write is
    scaled by the attention post-norm of the same run), parallel blocks, in-place MLP adds (Falcon),
    flattened MLP inputs (OPT), ALiBi (BLOOM): each unit kind and a condition, against plain transformers,
    and the sr_ln closed form."""
    import copy

    import tiny_families

    hf = tiny_families.build(family)
    w = read_weights(copy.deepcopy(hf), SEQ)
    rc = Recompute(hf, _rows())
    rows = _rows()
    ctx, src = FastBatch(w, rows), FastBatch(w, rows[PAIR])
    low_ctx = FastBatch(w, rows, torch.bfloat16)
    u = w.target_columns(rows.roll(-1, dims=1))
    worst: dict = {}
    for kind in ("resample", "mean", "zero"):
        for cond, labels in OTHER_UNITS.items():
            condition = parse_unit(cond) if cond else None
            units = _units(labels, w)
            t = _tables(ctx, src, kind, units, w, condition)
            if cond:
                ct = t["condition_tokens"].to_pandas().sort_values("token_index")
                lb, sb = ct["logit"].to_numpy(np.float64) - _unembed_bias(w), ct["ln_scale"].to_numpy(np.float64)
            else:
                lb = ctx.clean_logit(u)[:, :SEQ - 1].reshape(-1).double().numpy()
                sb = ctx.scale()[:, :SEQ - 1].reshape(-1).double().numpy()
            assert _identity_errors(t, lb, sb) < TOL, (kind, cond)
            if kind == "mean":  # bfloat16 products (BLOOM's and OPT's MLP write is itself a projection)
                low = _tables(low_ctx, None, kind, units, w, condition)
                assert _identity_errors(low, lb, sb) < TOL, (kind, cond, "bfloat16")
                a, b = (x["ablation_effects"].to_pandas().sort_values(["unit", "token_index"])["d_logit"].to_numpy()
                        for x in (t, low))
                assert np.abs(b - a).mean() <= 0.02 * np.abs(a).mean() and not np.array_equal(a, b), (cond, "bfloat16")
            for unit in units:
                want, got = rc.rows_for(kind, unit, condition), _effects(t, unit.label)
                for col in FLOATS:
                    scale = np.abs(want[col]).min() if col == "ln_scale" else 1.0
                    dev = np.abs(got[col] - want[col]).max() / scale
                    assert dev < (1e-5 if col == "ln_scale" else TOL), (kind, cond, unit.label, col, dev)
                    if col != "ln_scale":
                        worst[unit.kind + (" | cond" if cond else "")] = max(
                            worst.get(unit.kind + (" | cond" if cond else ""), 0.0), float(dev))
                moved = np.abs(want["d_logit"]).max()
                assert moved > 1e-2 or kind == "resample" and unit.last_layer() == 0, (kind, unit.label, moved)
    print(f"\n{family}: largest |fast - plain transformers| per unit kind: "
          + ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items())))
