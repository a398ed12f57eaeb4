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
    final = next(getattr(base, n) for n in ("ln_f", "final_layer_norm", "final_layernorm", "norm") if hasattr(base, n))
    return list(base.h if hasattr(base, "h") else base.layers), final


def _qk_norms(layer):
    """The query/key norms inside a layer's attention (Qwen3: q_norm, k_norm; Phi: q_layernorm, k_layernorm)."""
    attn = _attn(layer)
    return [getattr(attn, n) for n in ("q_norm", "k_norm", "q_layernorm", "k_layernorm") if hasattr(attn, n)]


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


def plain_reference(model, rows, src_rows, layer, head, frozen: str, given: tuple[int, int] | None = None,
                    freeze_qk: bool = True):
    """Centred correct-token logit change of a resample ablation of (layer, head) with frozen norms or
    attention, and the clean final-norm scale: plain transformers and hooks only. With `given` (a head),
    that head is resampled in every run, the baseline too, which then gives the frozen scales and patterns.
    Frozen norms include the query/key norms inside attention unless `freeze_qk` is False."""
    from transformers import AttentionInterface

    layers, final = _layers(model)
    n_heads = model.config.num_attention_heads
    d_head = getattr(model.config, "head_dim", None) or model.config.hidden_size // n_heads
    norms = [n for l in layers for n in _norms(l) + (_qk_norms(l) if freeze_qk else [])] + [final]
    scales, zs, probs = {}, {}, {}

    def rec_scale(m, a, o):
        scales[m] = _scale(m, a[0]).detach()

    def rec_z(i):
        return lambda m, a: zs.__setitem__(i, a[0].detach().clone())

    src_z = {}
    with torch.no_grad():
        hs = [_o_proj(_attn(l)).register_forward_pre_hook(lambda m, a, i=i: src_z.__setitem__(i, a[0].clone()))
              for i, l in enumerate(layers)]
        model(src_rows, use_cache=False)
        for h in hs:
            h.remove()

    def resample(lh):
        def hook(m, a):
            x = a[0].clone()
            sl = slice(lh[1] * d_head, (lh[1] + 1) * d_head)
            x[..., sl] = src_z[lh[0]][..., sl]
            return (x, *a[1:])
        return hook

    cond = [_o_proj(_attn(layers[given[0]])).register_forward_pre_hook(resample(given))] if given else []
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
    # A hook registered first runs first: the ablated head goes in on top of the condition's replacement.
    hs = cond + [_o_proj(_attn(layers[layer])).register_forward_pre_hook(resample((layer, head)))]
    if frozen == "frozen-norms":
        for n in [n for l in layers[layer:] for n in _norms(l) + (_qk_norms(l) if freeze_qk else [])] + [final]:
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
    _check_against_plain(families[family], frozen)


@pytest.mark.parametrize("family", ["qwen3", "phi"])
def test_frozen_norms_freeze_the_query_and_key_norms(family, monkeypatch):
    """Qwen3 normalises each head's queries and keys (RMS, input [batch, pos, head, d_head]); Phi with
    qk_layernorm does it with LayerNorms on [batch, head, pos, d_head]. Frozen norms freeze those too: the
    re-run equals plain hooks that freeze them, and differs from plain hooks that leave them live."""
    import tiny_families

    model = tiny_families.build(family, n_layers=2)
    got, (r, p), rows = _check_against_plain(model, "frozen-norms")
    live, _ = plain_reference(model, rows, rows.roll(1, 0), 0, 1, "frozen-norms", freeze_qk=False)
    assert np.abs(got.d_logit.to_numpy() - live[r, p].numpy()).max() > 1e-3
    # The ingest's self-check freezes them too: its whole forward agrees with the cut re-run.
    from selfrepair.ingest.ablate import FastBatch
    from selfrepair.ingest.counterfactual_check import counterfactual_checks
    from selfrepair.ingest.weights import read_weights

    from selfrepair.ingest import counterfactual as C

    real, cuts = C.rerun, []
    monkeypatch.setattr(C, "rerun", lambda *a, **k: cuts.append(a[5]) or real(*a, **k))
    w = read_weights(model, SEQ)
    devs = {}
    counterfactual_checks(lambda name, a, b: devs.__setitem__(name, float((a - b).abs().max())), w, rows,
                          FastBatch(w, rows), FastBatch(w, rows.roll(1, 0), source=True), "resample",
                          ("frozen-norms",), 0, 1, w.target_columns(rows.roll(-1, dims=1)))
    # The sample head and the next head of its layer, re-run in shared passes.
    assert list(devs) == [f"frozen-norms resample L0H{h}: cut re-run vs full model forward" for h in (1, 2)]
    assert cuts and all(c.owner is not None and set(c.owner) == {0, 1} for c in cuts)
    assert max(devs.values()) < 1e-5


def _check_against_plain(model, frozen):
    """Two heads of one layer (sharing passes, each on its own rows) through `ablation_tables` against
    `plain_reference`, each; L0H1's stored rows, its top tokens' (row, pos) and the token rows run."""
    from selfrepair.ingest.ablate import FastBatch, ablation_tables
    from selfrepair.ingest.counterfactual_rules import cuts_for
    from selfrepair.ingest.weights import read_weights
    from selfrepair.store.labels import parse_units

    model.set_attn_implementation("sdpa")
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 256, (BATCH, SEQ), generator=g)
    src_rows = rows.roll(1, 0)
    w = read_weights(model, SEQ)
    preds = SEQ - 1
    units = parse_units("L0H1,L0H2", w.n_layers, w.n_heads)
    # Top tokens in rows 1 and 2 only for L0H1, the last at position 7; L0H2's in rows 0, 1 and 2, one of them
    # past L0H1's last: the re-runs cut rows and positions, and row 1 of both units shares a pass.
    tops = {"L0H1": np.array([1 * preds + 2, 1 * preds + 5, 2 * preds + 7]),
            "L0H2": np.array([0 * preds + 6, 1 * preds + 5, 2 * preds + 3, 2 * preds + 9])}
    cuts = cuts_for([tops["L0H1"], tops["L0H2"]], preds)
    assert any(len(set(c.owners())) == 2 for c in cuts) and len(cuts) > 1
    tables = ablation_tables(FastBatch(w, rows), FastBatch(w, src_rows), "resample", 0, units, rows, 0,
                             tops, 0, 4, w, counterfactuals=(frozen,))
    runs = tables["counterfactual_runs"].to_pandas()
    effects = tables["ablation_effects"].to_pandas()
    sources = tables["counterfactual_sources"].to_pandas()
    out = None
    for unit in units:
        top = tops[unit.label]
        got = runs[runs.unit == unit.label]
        assert set(got.counterfactual) == {frozen} and list(got.token_index) == list(top)
        want, s_clean = plain_reference(model, rows, src_rows, unit.layer, unit.head, frozen)
        r, p = top // preds, top % preds
        np.testing.assert_allclose(got.d_logit, want[r, p].numpy(), atol=ATOL, rtol=1e-4)
        plain = effects[effects.unit == unit.label].set_index("token_index").d_logit.loc[top].to_numpy()
        assert np.abs(got.d_logit.to_numpy() - plain).max() > 1e-3  # the freezing changed something
        # The unit's own DE after patching, and its baseline DE, from the sweep's rows at the same tokens
        # (the replacement is the same whatever the re-run freezes).
        sweep = effects[effects.unit == unit.label].set_index("token_index").loc[top]
        np.testing.assert_allclose(got.de, sweep.de, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.de_base, sweep.de_base, rtol=1e-5, atol=1e-6)
        if frozen == "frozen-norms":  # the final norm divides by the clean scale
            np.testing.assert_allclose(got.ln_scale, s_clean[r, p].numpy(), rtol=1e-5)
            # Nothing rescales: the change in logit is exactly the sum of the changes in DE.
            np.testing.assert_allclose(got.d_logit, got.de - got.de_base + got.d_de_heads + got.d_de_mlps, atol=ATOL)
        src = sources[sources.unit == unit.label]
        sums = src.groupby("token_index").d_de.sum()
        np.testing.assert_allclose(sums.loc[top].to_numpy(), got.d_de_heads + got.d_de_mlps, atol=ATOL)
        if out is None:
            out = got, (r, p), rows
    return out


# -- through the store: one small ingest with both counterfactuals, units alone and under a condition --------
CF_SETTINGS = dict(tokens=62, seq_len=32, batch_size=2, ablations=("resample", "zero"), units="L0H1,MLP0,L1H2",
                   given=("L0H3",), top_p=0.1, neurons_top_k=0, counterfactuals=("frozen-norms", "frozen-attention"))


@pytest.fixture(scope="module")
def cf_store(tiny_stores, tmp_path_factory):
    return tiny_stores.copy("gpt2", tmp_path_factory.mktemp("cf") / "s", **CF_SETTINGS)


def test_frozen_norms_identities_through_sql(cf_store):
    """Under frozen norms nothing rescales: sr_ln = 0 in closed form and as the remainder, so
    d_logit = d_de + d_de_heads + d_de_mlps; for every unit, alone and given a condition."""
    from selfrepair import Store

    got = Store.open(cf_store).sql("""
        SELECT c.condition, c.unit, count(*) AS n,
               max(abs(c.d_logit - c.d_de - c.d_de_heads - c.d_de_mlps)) AS remainder,
               -- the closed form with the counterfactual's final scale: (s/s_cf - 1) · Σ DE_cf
               max(abs((b.ln_scale / c.ln_scale - 1) * (b.logit + c.d_logit - t.unembed_bias)
                       * c.ln_scale / b.ln_scale)) AS closed
        FROM counterfactual_effects c
        JOIN tokens t USING (model, token_index)
        JOIN (SELECT model, '' AS condition, '' AS ablation, -1 AS sample, token_index, logit, ln_scale FROM tokens
              UNION ALL SELECT model, condition, ablation, sample, token_index, logit, ln_scale FROM condition_tokens) b
          ON b.model = c.model AND b.condition = c.condition AND b.token_index = c.token_index
         AND (c.condition = '' OR (b.ablation = c.ablation AND b.sample = c.sample))
        WHERE c.counterfactual = 'frozen-norms'
        GROUP BY ALL ORDER BY ALL""")
    assert got.height == 6  # 3 units, alone and given L0H3 (none overlaps it)
    assert (got["n"] > 0).all()
    assert (got["remainder"] < 1e-5).all(), got
    assert (got["closed"] < 1e-5).all(), got


def test_channels_sum_to_self_repair_and_the_query_summarises_them(cf_store):
    from selfrepair import Store

    s = Store.open(cf_store)
    ch = s.sql("SELECT * FROM repair_channels")
    n_cf = s.sql("SELECT count(*) FROM counterfactual_effects WHERE counterfactual = 'frozen-norms'").item()
    assert ch.height == n_cf  # one row per unit, draw, condition and top token
    total = ch["ln_final"] + ch["ln_intermediate"] + ch["attention"] + ch["rest"]
    assert np.allclose(total.to_numpy(), ch["sr"].to_numpy(), atol=1e-6)
    assert np.allclose(ch["ln_final"].to_numpy(), ch["sr_ln"].to_numpy(), atol=1e-5)  # the closed form is sr_ln
    assert (ch.filter(ch["unit"] == "L1H2")["attention"].abs() < 1e-6).all()  # nothing after the last layer moves
    summary = s.query("head_repair_channels", ablation="zero")
    assert sorted(summary["unit"].to_list()) == ["L0H1", "L1H2", "MLP0"]
    assert summary["attention"].is_not_null().all() and summary["rest"].is_not_null().all()


def test_the_store_verifies_and_compacts_with_counterfactuals(cf_store, tmp_path):
    import shutil

    from selfrepair import Store
    from selfrepair.store.compact import compact
    from selfrepair.store.verify import verify

    store = tmp_path / "s"
    shutil.copytree(cf_store, store)
    before = Store.open(store).sql("SELECT * FROM counterfactual_sources ORDER BY ALL")
    compact(store)
    assert verify(store).ok
    assert Store.open(store).sql("SELECT * FROM counterfactual_sources ORDER BY ALL").equals(before)


def _config_only(folder, config) -> str:
    config.architectures = [config.__class__.__name__.replace("Config", "ForCausalLM")]
    config.save_pretrained(folder)  # no weights: a load would fail with another error
    return str(folder)


@pytest.mark.parametrize("name, make, why", [
    ("frozen-attention", lambda: __import__("transformers").GPTNeoConfig(num_layers=2, attention_types=[[["global"], 2]]),
     "Error: counterfactuals: GPT-Neo: its attention (GPTNeoSelfAttention) computes the softmax itself, not through "
     "transformers' AttentionInterface, so frozen-attention cannot replace its patterns"),
    ("frozen-norms", lambda: __import__("transformers").Gemma2Config(num_hidden_layers=2),
     "Error: counterfactuals: Gemma 2: a head's DE in post-norm blocks is defined at the run's own post-norm scale "
     "(DESIGN.md), which frozen-norms would contradict"),
    ("frozen-gradients", None,
     "Error: Invalid value for '--counterfactuals': unknown counterfactual 'frozen-gradients'; choose from none, "
     "frozen-norms, frozen-attention"),
])
def test_bad_counterfactuals_are_one_error_line_before_the_model_loads(tmp_path, name, make, why):
    from click.testing import CliRunner

    from selfrepair.cli import main

    model = _config_only(tmp_path / "m", make()) if make else "gpt2-small"
    res = CliRunner().invoke(main, ["ingest", "--model", model, "--store", str(tmp_path / "s"),
                                    "--counterfactuals", name, "--quiet"])
    assert res.exit_code != 0
    errors = [line for line in res.output.splitlines() if line.startswith("Error")]
    assert errors == [why], res.output
    assert not (tmp_path / "s").exists()


def test_self_check_recomputes_each_counterfactual_from_a_whole_forward(cf_store):
    from tiny_models import read_manifest_json

    checks = read_manifest_json(next(cf_store.iterdir()))["self_check"]["deviations"]
    for name in ("frozen-norms", "frozen-attention"):
        for head in (1, 2):  # the sample head and the next of its layer, sharing their passes
            assert checks[f"{name} resample L0H{head}: cut re-run vs full model forward"] < 1e-5


def test_head_page_shows_the_channels(cf_store):
    from selfrepair import Store
    from selfrepair.analysis.head_page import build_head_page, html, text

    s = Store.open(cf_store)
    page = build_head_page(s, "L0H1", ablation="zero")
    want = s.query("head_repair_channels", ablation="zero")
    row = want.filter(want["unit"] == "L0H1").row(0, named=True)
    assert page.channels["attention"] == row["attention"]
    out = text(page)
    assert "Repair channels, from counterfactual re-runs" in out and "attention moving" in out
    assert 'id="channels"' in html(page)
    alone = build_head_page(s, "L0H1", ablation="zero", given="L0H3")
    assert alone.channels is not None and alone.channels["n_tokens"] == row["n_tokens"]


def test_report_figure_of_channels(cf_store):
    from dataclasses import replace

    from selfrepair import Store
    from selfrepair.analysis import registry
    from selfrepair.analysis.context import Context, ModelInfo

    s = Store.open(cf_store)
    name = s.models[0]
    info = ModelInfo.from_manifest(name, s.manifest(name))
    assert info.counterfactuals == ("frozen-norms", "frozen-attention")
    spec = registry.figure("fig_repair_channels")
    ctx = Context((info,), "zero", 0.1)
    assert spec.shown(ctx) and not spec.shown(Context((replace(info, counterfactuals=()),), "zero", 0.1))
    df = s.query(spec.query, **spec.runs(ctx)[0])
    fig = spec.plot(df, ctx)
    assert fig.axes and df.height == 3


@pytest.mark.parametrize("frozen", ["frozen-norms", "frozen-attention"])
def test_under_a_condition_the_baseline_is_the_condition_ablated_run(families, frozen):
    """L1H2 given L0H3 on tiny Llama: the frozen scales and patterns are the L0H3-ablated run's."""
    from selfrepair.ingest.ablate import FastBatch, ablation_tables
    from selfrepair.ingest.weights import read_weights
    from selfrepair.store.labels import parse_units

    model = families["llama"]
    model.set_attn_implementation("sdpa")
    g = torch.Generator().manual_seed(2)
    rows = torch.randint(0, 256, (BATCH, SEQ), generator=g)
    src_rows = rows.roll(1, 0)
    w = read_weights(model, SEQ)
    preds = SEQ - 1
    unit, cond = (parse_units(x, w.n_layers, w.n_heads)[0] for x in ("L0H1", "L0H3"))
    top = np.array([0 * preds + 4, 2 * preds + 1, 3 * preds + 9])
    tables = ablation_tables(FastBatch(w, rows), FastBatch(w, src_rows), "resample", 0, [unit], rows, 0,
                             {unit.label: top}, 0, 4, w, condition=cond, counterfactuals=(frozen,))
    got = tables["counterfactual_runs"].to_pandas()
    assert set(got.condition) == {"L0H3"}
    want, _ = plain_reference(model, rows, src_rows, 0, 1, frozen, given=(0, 3))
    np.testing.assert_allclose(got.d_logit, want[top // preds, top % preds].numpy(), atol=ATOL, rtol=1e-4)


def test_units_of_one_layer_share_passes_and_equal_their_runs_alone(families, monkeypatch):
    """Units of one first layer share passes (heads and a whole attention layer; an MLP and a block, which
    replace the MLP write, apart from those), each on its own rows: their values equal each unit's run alone
    to float32 rounding (the pass's products have other shapes), in fewer passes. A unit of another layer,
    or one replacing a later layer too, changes nothing, bit for bit."""
    from selfrepair.ingest import counterfactual as C
    from selfrepair.ingest.ablate import FastBatch, unit_patch
    from selfrepair.ingest.weights import read_weights
    from selfrepair.store.labels import parse_units

    model = families["llama"]
    model.set_attn_implementation("sdpa")
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(0, 256, (BATCH, SEQ), generator=g)
    w = read_weights(model, SEQ)
    preds = SEQ - 1
    fast, src = FastBatch(w, rows), FastBatch(w, rows.roll(1, 0))
    u = w.target_columns(rows.roll(-1, dims=1))
    units = parse_units("L0H1,L0H2,ATTN0,MLP0,BLOCK0,L1H0,pair=L0H3+L1H1", w.n_layers, w.n_heads)
    tops = {"L0H1": [1 * preds + 3], "L0H2": [0 * preds + 9, 3 * preds + 10], "ATTN0": [1 * preds + 3, 2 * preds + 2],
            "MLP0": [3 * preds + 2], "BLOCK0": [0 * preds + 1, 3 * preds + 5], "L1H0": [2 * preds + 1, 2 * preds + 6],
            "pair": [1 * preds + 4]}
    tops = {k: np.array(v) for k, v in tops.items()}
    passes = []
    real = C.rerun
    monkeypatch.setattr(C, "rerun", lambda *a, **k: passes.append(a[5]) or real(*a, **k))

    def run(us):
        cache: dict = {}
        got = C.batch_reruns(w, fast, us, tops, ("frozen-norms", "frozen-attention"),
                             lambda unit: unit_patch(fast, src, "resample", unit, w.n_heads, cache), u, 0, preds)
        return {(r.unit.label, r.name): r for r in got}

    together = run(units)
    assert any(c.owner is not None and len(np.unique(c.owner)) > 1 for c in passes)  # a pass serves 2 units
    assert len(together) == 2 * len(units)
    n_together = len(passes)
    passes.clear()
    for unit in units:
        for key, alone in run([unit]).items():
            both = together[key]
            assert list(alone.tokens) == list(both.tokens) == list(tops[unit.label])
            for f in ("logit", "ln_scale", "de", "d_heads", "d_mlps"):
                if unit.label in ("L1H0", "pair"):  # alone in its passes either way
                    assert torch.equal(getattr(alone, f), getattr(both, f)), (key, f)
                torch.testing.assert_close(getattr(alone, f), getattr(both, f), rtol=1e-5, atol=1e-6, msg=str((key, f)))
    assert n_together < len(passes)


def test_pass_groups_share_only_what_is_exact():
    """Heads and attention layers of one first layer together, MLP and block units (which replace its MLP
    write) together apart from them, `per_pass` at a time; a unit reaching past its first layer, and every
    unit of a model with attention post-norms, alone."""
    from selfrepair.ingest.counterfactual_rules import pass_groups
    from selfrepair.store.labels import parse_units

    units = parse_units("L0H0,MLP0,L0H1,ATTN0,BLOCK0,L1H0,pair=L0H2+L1H1,L0H3", 2, 4)
    labels = lambda gs: [[u.label for u in g] for g in gs]  # noqa: E731
    assert labels(pass_groups(units, 4, 8, False)) == [["L0H0", "L0H1", "ATTN0", "L0H3"], ["MLP0", "BLOCK0"],
                                                       ["pair"], ["L1H0"]]
    assert labels(pass_groups(units, 4, 3, False))[:2] == [["L0H0", "L0H1", "ATTN0"], ["L0H3"]]
    assert all(len(g) == 1 for g in pass_groups(units, 4, 8, True))


def test_run_fraction_counts_each_units_own_rows_and_positions():
    """Per batch and unit: the rows holding one of its top tokens, up to its last top position there, split
    into passes by that position, against every unit running every row at every position."""
    from selfrepair.ingest.counterfactual_rules import cuts_for, run_fraction
    from selfrepair.store.labels import parse_units

    seq, preds = 6, 5
    a, b = parse_units("L0H0,L0H1", 1, 2)
    # Batch 0 (rows 0-1): a at row 0 pos 1; b at row 1 pos 4 and row 0 pos 0. Batch 1 (rows 2-3): b at row 3 pos 2.
    tops = {a.label: np.array([0 * preds + 1]), b.label: np.array([0 * preds + 0, 1 * preds + 4, 3 * preds + 2])}
    frac = run_fraction(tops, [a, b], n_rows=4, batch_size=2, seq_len=seq, n_heads=2, per_pass=2, post_norm=False)
    # a: 1 row × 2 positions; b in batch 0: rows 0 (1 position) and 1 (5 positions), apart; b in batch 1: 1 × 3.
    assert [(list(c.rows), c.n_pos) for c in cuts_for([tops[b.label][:2]], preds)] == [([0], 1), ([1], 5)]
    # Sharing passes, a's row 0 goes with b's row 0 (positions 2 and 1), b's row 1 apart; in one pass, all three.
    shared = cuts_for([tops[a.label], tops[b.label][:2]], preds, max_cuts=2)
    assert [(list(c.rows), list(c.owners()), c.n_pos) for c in shared] == [([0, 0], [0, 1], 2), ([1], [1], 5)]
    one = cuts_for([tops[a.label], tops[b.label][:2]], preds, max_cuts=1)
    assert [(list(c.rows), list(c.owners()), c.n_pos) for c in one] == [([0, 0, 1], [0, 1, 1], 5)]
    assert (frac.rows, frac.rows_full) == (1 + 2 + 1, 2 * 2 * 2)
    assert (frac.cells, frac.cells_full) == (2 + 1 + 5 + 3, 2 * 2 * 2 * seq)
    assert "50.0% of the rows" in frac.line()


def test_no_pattern_is_recorded_for_a_batch_without_top_tokens(families, monkeypatch):
    """Frozen attention records the baseline's patterns (one eager forward) only for a batch where some unit
    has a top token."""
    from selfrepair.ingest import counterfactual
    from selfrepair.ingest.ablate import FastBatch, unit_patch
    from selfrepair.ingest.weights import read_weights
    from selfrepair.store.labels import parse_units

    model = families["llama"]
    model.set_attn_implementation("sdpa")
    rows = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(4))
    w = read_weights(model, SEQ)
    fast = FastBatch(w, rows)
    units = parse_units("L0H1,L1H0", w.n_layers, w.n_heads)
    recorded = []
    real = counterfactual.record_patterns
    monkeypatch.setattr(counterfactual, "record_patterns", lambda *a: recorded.append(1) or real(*a))
    run = lambda tops: list(counterfactual.batch_reruns(  # noqa: E731
        w, fast, units, tops, ("frozen-attention",), lambda unit: unit_patch(fast, fast, "zero", unit, w.n_heads),
        w.target_columns(rows.roll(-1, dims=1)), 0, SEQ - 1))
    assert run({}) == [] and not recorded
    got = run({"L0H1": np.array([3]), "L1H0": np.array([SEQ + 2])})
    assert len(got) == 2 and len(recorded) == 1  # once per batch, whatever the units


@pytest.mark.parametrize("family", [f for f in __import__("tiny_families").FAMILIES if f not in ("gptneo", "bloom")])
def test_recorded_patterns_equal_an_eager_forward(family):
    """Frozen attention's baseline patterns, each layer's attention run alone on the stored input under
    eager attention, equal the attentions plain transformers returns from one eager forward, on every family
    that can run it (sliding windows, ALiBi, grouped heads, parallel blocks included)."""
    import tiny_families

    from selfrepair.ingest.ablate import FastBatch
    from selfrepair.ingest.counterfactual import record_patterns
    from selfrepair.ingest.weights import read_weights

    model = tiny_families.build(family)
    seq = 2 * tiny_families.WINDOW  # past the sliding window
    rows = torch.randint(1, 200, (2, seq), generator=torch.Generator().manual_seed(5))
    w = read_weights(model, seq)
    got = record_patterns(w, FastBatch(w, rows), 1)  # under the model's own implementation (SDPA where it has it)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        want = model(rows, output_attentions=True, use_cache=False).attentions
    assert got[0] is None and len(got) == len(want)
    for i in range(1, len(want)):
        torch.testing.assert_close(got[i], want[i].float(), rtol=1e-4, atol=1e-5, msg=f"layer {i}")


def test_a_re_run_that_overflows_is_never_stored(tiny_model_dirs, tmp_path, monkeypatch):
    """Under frozen norms nothing rescales the residual, and on some models (SmolLM2's early heads) it grows
    past float32's range: such a token's re-run is left out, never stored. Here every frozen-norms re-run of
    each batch's first row overflows (its logit made infinite, in the re-run and in the self-check's whole
    forward alike): counterfactual_coverage counts those tokens, repair_channels leaves them out, the ingest
    says how many, and frozen-attention keeps every token."""
    from click.testing import CliRunner

    from selfrepair import Store
    from selfrepair.cli import main
    from selfrepair.ingest import counterfactual as C
    from selfrepair.ingest import counterfactual_check

    real_rerun, real_whole = C.rerun, counterfactual_check.whole_forward_counterfactual

    def rerun(w, base, name, layer, patches, cut, *a, **k):
        r = real_rerun(w, base, name, layer, patches, cut, *a, **k)
        if name == "frozen-norms":
            r.logit[torch.as_tensor(cut.rows) == 0] = float("inf")
        return r

    def whole(w, rows, layer, head, z, name):
        out = real_whole(w, rows, layer, head, z, name)
        if name == "frozen-norms":
            out[0] = float("inf")
        return out

    monkeypatch.setattr(C, "rerun", rerun)
    monkeypatch.setattr(counterfactual_check, "whole_forward_counterfactual", whole)
    store = tmp_path / "s"
    seq, batch = 32, 2
    res = CliRunner().invoke(main, [
        "ingest", "--model", str(tiny_model_dirs["gpt2"]), "--store", str(store), "--tokens", "124", "--seq-len",
        str(seq), "--batch-size", str(batch), "--ablations", "zero", "--units", "L0H1,L1H2", "--top-p", "0.1",
        "--neurons-top-k", "0", "--corpus", "embedded", "--counterfactuals", "frozen-norms,frozen-attention"])
    assert res.exit_code == 0, res.output
    s = Store.open(store)
    first = f"(token_index // {seq - 1}) % {batch} = 0"  # the tokens of each batch's first row
    top = s.sql(f"SELECT count(*) AS n, count(*) FILTER (WHERE {first}) AS first FROM ablation_top").row(0, named=True)
    assert 0 < top["first"] < top["n"]
    got = s.sql(f"""SELECT counterfactual, count(*) AS n, count(*) FILTER (WHERE {first}) AS first
                    FROM counterfactual_effects GROUP BY ALL ORDER BY ALL""")
    assert got.rows() == [("frozen-attention", top["n"], top["first"]), ("frozen-norms", top["n"] - top["first"], 0)]
    cov = s.query("counterfactual_coverage").sort("counterfactual")
    assert cov["n_missing"].to_list() == [0, top["first"]] and (cov["n_top"] == top["n"]).all()
    channels = s.sql(f"SELECT count(*) AS n, count(*) FILTER (WHERE {first}) AS first FROM repair_channels").row(0)
    assert channels == (top["n"] - top["first"], 0)
    assert (f"frozen-norms: {top['first']:,} of {top['n']:,} top-token re-runs overflowed float32 and are not stored"
            in res.output)
    summary = s.query("head_repair_channels", ablation="zero")
    assert summary["n_left_out"].sum() == top["first"] and (summary["n_tokens"] + summary["n_left_out"]).sum() == top["n"]
    from selfrepair.analysis.head_page import build_head_page, text

    unit = summary.filter(summary["n_left_out"] > 0).row(0, named=True)
    page = text(build_head_page(s, unit["unit"], ablation="zero"))
    assert (f"over {unit['n_tokens']} of its {unit['n_tokens'] + unit['n_left_out']} top tokens "
            f"({unit['n_left_out']} left out: a re-run overflowed float32, never stored)") in page
    assert "frozen-attention:" not in res.output.replace("frozen-norms,frozen-attention", "")
