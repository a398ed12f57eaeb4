"""Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): head units against plain transformers.

Attention is ordinary in these families, so heads, head groups and whole attention layers are
ablated as anywhere else; the router recomputes on the ablated run like everything downstream.
A layer's MLP DE is its sparse block's write to the residual (the routed experts' outputs,
weighted by the router, plus any gated shared expert): `mlp_effects` and `d_de_mlps` use it and
both identities (Σ DE = logit − b_U; the sr_ln closed form) hold. MLP and block units and the
final-MLP neuron detail are not defined (there is no one MLP with one set of neurons): MLPn or
BLOCKn is refused with one `Error:` line before the model loads, and neuron detail is switched
off with a note.

The recomputation is the Hugging Face model with hooks only (tests/ingest/test_unit_engine.py's
`Recompute`, tests/recompute.py's weights): no selfrepair code. Tiny random models: every bias
the family has and every norm gain perturbed (tests/tiny_families.py `perturb`).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import tiny_families as T
from selfrepair import Store
from selfrepair.cli import main
from selfrepair.errors import ConfigError
from selfrepair.ingest.ablate import FastBatch, ablation_tables, check_units, unit_kind_problem, unit_patch
from selfrepair.ingest.clean import TokenStrings, run_clean
from selfrepair.ingest.weights import read_weights
from selfrepair.store.labels import parse_unit
from test_unit_engine import BATCH, FLOATS, PAIR, SEQ, TOL, Recompute, _rows

MOE = ("mixtral", "qwen2moe", "qwen3moe", "olmoe")
ARCHS = {"mixtral": "MixtralForCausalLM", "qwen2moe": "Qwen2MoeForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM",
         "olmoe": "OlmoeForCausalLM"}
KINDS = ("resample", "mean", "zero")
UNITS = ["L0H1", "L1H3", "L2H0", "L0H1+L1H2", "L0H0+L0H1+L0H2+L0H3", "ATTN0", "ATTN1", "ATTN2"]
CONDITIONED = {"L0H2": ["L1H0", "ATTN1", "L0H0+L2H3"], "ATTN1": ["L0H3", "L2H1"]}
TOP = np.array([t for t in range(1, BATCH * (SEQ - 1), 4) if t % (SEQ - 1)])


def build(family: str, n_layers: int = 3):
    """A tiny random MoE model: 4 experts, 2 routed per token (Qwen2-MoE: a gated shared expert too)."""
    import transformers as tr

    if family == "mixtral":
        return T.build("mixtral", n_layers)
    torch.manual_seed(0)
    common = dict(vocab_size=T.V, hidden_size=T.D, num_hidden_layers=n_layers, num_attention_heads=T.H,
                  num_key_value_heads=T.KV, max_position_embeddings=T.CTX, bos_token_id=T.BOS,
                  eos_token_id=T.EOS, pad_token_id=T.PAD, num_experts=4, num_experts_per_tok=2)
    if family == "qwen2moe":
        model = tr.Qwen2MoeForCausalLM(tr.Qwen2MoeConfig(
            **common, intermediate_size=T.FF, moe_intermediate_size=T.D, shared_expert_intermediate_size=T.D,
            qkv_bias=True, norm_topk_prob=False))
    elif family == "qwen3moe":
        model = tr.Qwen3MoeForCausalLM(tr.Qwen3MoeConfig(
            **common, head_dim=T.D // T.H, intermediate_size=T.FF, moe_intermediate_size=T.D, attention_bias=True,
            norm_topk_prob=True))
    else:
        model = tr.OlmoeForCausalLM(tr.OlmoeConfig(**common, intermediate_size=T.D, attention_bias=True))
    T.perturb(model, family)
    return model.float().eval()


def save(family: str, folder) -> str:
    from selfrepair.ingest.synthetic import byte_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    build(family).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def loaded():
    """family -> (processed weights of the model, plain-transformers recomputation of a deep copy)."""
    out = {}
    for family in MOE:
        hf = build(family)
        out[family] = (read_weights(hf, SEQ), Recompute(copy.deepcopy(hf), _rows()))
    return out


def _units(labels, w):
    return [parse_unit(x, w.n_layers, w.n_heads) for x in labels]


def _cases():
    yield "", UNITS
    yield from CONDITIONED.items()


@pytest.fixture(scope="module")
def tables(loaded):
    """family -> engine (float32 fast, bfloat16 fast) -> kind -> condition label ("" none) -> tables."""
    out = {}
    rows = _rows()
    for family, (w, _) in loaded.items():
        for engine, dtype in (("fast", None), ("bfloat16", torch.bfloat16)):
            ctx, src = FastBatch(w, rows, dtype), FastBatch(w, rows[PAIR], dtype)
            for kind in KINDS:
                got = out.setdefault(family, {}).setdefault(engine, {}).setdefault(kind, {})
                for cond, labels in _cases():
                    units = _units(labels, w)
                    got[cond] = ablation_tables(ctx, src if kind == "resample" else None, kind, 0, units, rows, 0,
                                                {u.label: TOP for u in units}, 0, 3, w, attention_top_k=2,
                                                condition=parse_unit(cond) if cond else None)
    return out


def _effects(t, label: str) -> dict[str, np.ndarray]:
    eff = t["ablation_effects"].to_pandas()
    eff = eff[eff["unit"] == label].sort_values("token_index")
    assert len(eff) == BATCH * (SEQ - 1), label
    return {c: eff[c].to_numpy() for c in eff.columns}


# -- which units are defined -----------------------------------------------------------------------
@pytest.mark.parametrize("family", MOE)
def test_moe_defines_head_units_only(loaded, family):
    w, _ = loaded[family]
    assert w.family.moe and w.down_final is None and w.d_mlp == 0
    for name in (w.family.name, ARCHS[family]):
        for kind in ("head", "group", "attn"):
            assert unit_kind_problem(name, kind) is None
        for kind in ("mlp", "block"):
            problem = unit_kind_problem(name, kind)
            assert problem.startswith(w.family.name) and f"{kind} units are not defined" in problem
            assert "mixture of experts" in problem and "\n" not in problem
    check_units(w, _units(UNITS, w))
    check_units(w, _units(CONDITIONED["L0H2"], w), parse_unit("L0H2"))
    for label in ("MLP1", "BLOCK0"):
        with pytest.raises(ConfigError, match=f"^{label}: {w.family.name}: its MLP is a mixture of experts"):
            check_units(w, _units([label], w))
    with pytest.raises(ConfigError, match="^MLP0: "):
        check_units(w, _units(["L1H0"], w), parse_unit("MLP0"))


def test_dense_families_keep_every_kind():
    for name in ("Mistral", "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3", "OLMo"):
        for kind in ("head", "group", "attn", "mlp", "block"):
            assert unit_kind_problem(name, kind) is None


# -- the engine against plain transformers ----------------------------------------------------------
@pytest.mark.parametrize("family", MOE)
def test_head_units_equal_plain_transformers(loaded, tables, family):
    """d_logit, the ablated final-norm scale, the unit's DE, its baseline DE, and the ΔDE of every other head
    and of every MoE block (its write: routed experts weighted by the router, recomputed on the ablated run)."""
    w, rc = loaded[family]
    worst, moved = {}, 0.0
    for kind in KINDS:
        for cond, labels in _cases():
            condition = parse_unit(cond) if cond else None
            for unit in _units(labels, w):
                want = rc.rows_for(kind, unit, condition)
                got = _effects(tables[family]["fast"][kind][cond], unit.label)
                for col in FLOATS:
                    if col == "ln_scale":
                        dev = np.abs(got[col] / want[col] - 1).max()
                        assert dev < 1e-5, (kind, cond, unit.label, col, dev)
                    else:
                        dev = np.abs(got[col] - want[col]).max()
                        assert dev < TOL, (kind, cond, unit.label, col, dev)
                    worst[col] = max(worst.get(col, 0.0), float(dev))
                assert (got["unit_kind"] == unit.kind).all() and (got["condition"] == cond).all()
                if unit.last_layer() < 2:
                    moved = max(moved, float(np.abs(want["d_de_mlps"]).max()))
    assert moved > 1e-2  # the MoE blocks' writes really change downstream: the comparison is not 0 = 0
    print(f"\n{family}: largest |fast - plain transformers|: "
          + ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items())))


@pytest.mark.parametrize("family", MOE)
def test_clean_tables_equal_plain_transformers_and_sum_to_the_logit(loaded, family):
    """mlp_effects is each MoE block's DE; Σ DE (de_other + heads + MLP blocks) = logit − b_U."""
    w, rc = loaded[family]
    rows = _rows()
    from selfrepair.ingest.synthetic import byte_tokenizer

    batch = run_clean(w, rows, 0, TokenStrings(byte_tokenizer()), with_arrays=True)
    tok = batch.tables["tokens"].to_pandas()
    s = rc.scale(rc.clean)
    heads, mlps = rc.des(rc.clean, s)
    he = batch.tables["head_effects"].to_pandas().sort_values(["layer", "head", "token_index"])
    me = batch.tables["mlp_effects"].to_pandas().sort_values(["layer", "token_index"])
    assert np.abs(he["de"].to_numpy() - heads.reshape(-1).numpy()).max() < TOL
    assert np.abs(me["de"].to_numpy() - mlps.reshape(-1).numpy()).max() < TOL
    assert np.abs(tok["logit"].to_numpy() - tok["unembed_bias"].to_numpy() - rc.logit(rc.clean).numpy()).max() < TOL
    total = tok["de_other"].to_numpy(np.float64) + he.groupby("token_index")["de"].sum().to_numpy(np.float64) \
        + me.groupby("token_index")["de"].sum().to_numpy(np.float64)
    assert np.abs(total - (tok["logit"] - tok["unembed_bias"]).to_numpy(np.float64)).max() < TOL
    assert np.abs(me["de"]).max() > 1e-2  # the blocks write something toward the target
    assert "mlp_post_final" not in batch.arrays  # no final-MLP neurons in a mixture of experts


@pytest.mark.parametrize("engine", ["fast", "bfloat16"])
@pytest.mark.parametrize("family", MOE)
def test_sr_ln_closed_form_holds(loaded, tables, family, engine):
    """DESIGN.md's sr_ln closed form on every row, against the baseline each row names (the clean run, or
    the condition-ablated run); no neuron rows (neuron detail is not defined)."""
    w, _ = loaded[family]
    rows = _rows()
    ctx, src = FastBatch(w, rows), FastBatch(w, rows[PAIR])
    preds = SEQ - 1
    u = w.target_columns(rows.roll(-1, dims=1))
    for kind in KINDS:
        for cond, _labels in _cases():
            base = ctx if not cond else ctx.conditioned(unit_patch(ctx, src, kind, parse_unit(cond), w.n_heads))
            lb = base.clean_logit(u)[:, :preds].reshape(-1).double().numpy()
            sb = base.scale()[:, :preds].reshape(-1).double().numpy()
            t = tables[family][engine][kind][cond]
            eff = t["ablation_effects"].to_pandas()
            idx = eff["token_index"].to_numpy()
            d = {c: eff[c].to_numpy(np.float64) for c in FLOATS}
            sr_ln = d["d_logit"] - (d["de"] - d["de_base"]) - d["d_de_heads"] - d["d_de_mlps"]
            closed = (sb[idx] / d["ln_scale"] - 1) * (lb[idx] + d["d_logit"]) * d["ln_scale"] / sb[idx]
            assert np.abs(closed).max() > 100 * TOL  # the norm's scale really moves
            assert np.abs(sr_ln - closed).max() < TOL, (kind, cond)
            for name in ("neuron_effects", "neuron_totals"):
                assert name not in t or t[name].num_rows == 0


@pytest.mark.parametrize("family", MOE)
def test_bfloat16_sweep_is_close_to_float32(tables, family):
    """d_logit of the bfloat16 sweep is close to float32's, except where the router's top-k choice flips:
    routing is discontinuous, and a token whose k-th and (k+1)-th experts' probabilities are within the
    low-precision change (tiny Qwen2-MoE: one token at a margin of 1e-5) takes other experts. Such
    flips are rare: at most 1 in 20 rows of a unit."""
    for kind in KINDS:
        for cond, _labels in _cases():
            a, b = (tables[family][e][kind][cond]["ablation_effects"].to_pandas().sort_values(["unit", "token_index"])
                    for e in ("fast", "bfloat16"))
            err = np.abs(a["d_logit"].to_numpy() - b["d_logit"].to_numpy())
            assert np.median(err) < 0.01 and (err > 0.05).mean() <= 0.05, (kind, cond, err.max())


# -- the CLI: what an MoE ingest stores and refuses ------------------------------------------------
def _invoke(model_dir, store, *args):
    return CliRunner().invoke(main, ["ingest", "--model", str(model_dir), "--store", str(store), "--tokens", "124",
                                     "--seq-len", "32", "--batch-size", "2", "--corpus", "embedded", *args])


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return save("mixtral", tmp_path_factory.mktemp("models") / "tiny-mixtral")


@pytest.mark.parametrize("args, line", [
    (["--units", "MLP1"], "Error: MLP1: Mixtral: its MLP is a mixture of experts, not one MLP, so mlp units are "
                          "not defined (head, group and attn units are)"),
    (["--units", "L0H1,BLOCK2"], "Error: BLOCK2: Mixtral: its MLP is a mixture of experts, not one MLP, so block "
                                 "units are not defined (head, group and attn units are)"),
    (["--units", "mlps"], "Error: MLP0: Mixtral: its MLP is a mixture of experts"),
    (["--heads", "L1", "--given", "MLP0"], "Error: MLP0: Mixtral: its MLP is a mixture of experts"),
    (["--sr-mlps-neurons", "penultimate"], "Error: sr_mlps_neurons: Mixtral: final-MLP neurons are not defined for a "
                                           "mixture-of-experts MLP (each expert has its own), so --sr-mlps-neurons "
                                           "must be none (got penultimate)"),
])
def test_undefined_kinds_are_refused_before_the_model_loads(mixtral_dir, tmp_path, monkeypatch, args, line):
    from selfrepair.ingest import models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", no_load)
    res = _invoke(mixtral_dir, tmp_path / "store", *args, "--quiet")
    assert res.exit_code != 0 and "Traceback" not in res.output, res.output
    assert res.output.strip().splitlines() == [res.output.strip()] and res.output.startswith(line), res.output
    assert not (tmp_path / "store").exists()


def test_mixtral_ingest_stores_heads_and_block_des_without_neurons(mixtral_dir, tmp_path):
    """Default settings (neuron detail on, every array): heads, a group and an attention layer are stored,
    each MoE block's DE and ΔDE too, both identities hold through SQL, and neuron detail is off with a note."""
    res = _invoke(mixtral_dir, tmp_path / "store", "--ablations", "zero,resample", "--top-p", "0.1",
                  "--units", "L0H1,L2,ATTN1,L0H0+L1H2", "--neurons-top-k", "5")
    assert res.exit_code == 0, res.output
    assert ("note: Mixtral: final-MLP neurons are not defined for a mixture-of-experts MLP (each expert has its own); "
            "neuron detail (neuron_effects, neuron_totals) and the mlp_post_final array are off") in res.output
    store = Store.open(tmp_path / "store")
    name = store.models[0]
    manifest = store.manifest(name)
    n = manifest.n_tokens
    assert manifest.config.raw["neurons_top_k"] == 0
    assert "mlp_post_final" not in manifest.arrays_json() and "mlp_post_final" not in json.dumps(manifest.arrays_json())
    counts = store.sql("SELECT unit_kind, count(*) AS n FROM ablation_effects WHERE model = $m GROUP BY unit_kind "
                       "ORDER BY unit_kind", {"m": name})
    assert dict(zip(counts["unit_kind"], counts["n"])) == {"attn": 2 * n, "group": 2 * n, "head": 2 * 5 * n}
    assert store.sql("SELECT count(*) AS n FROM mlp_effects WHERE model = $m", {"m": name})["n"][0] == 3 * n
    assert store.sql("SELECT count(*) AS n FROM neuron_effects WHERE model = $m", {"m": name})["n"][0] == 0
    assert store.sql("SELECT max(abs(d_de_mlps)) AS x FROM ablation_effects WHERE model = $m AND layer = 0",
                     {"m": name})["x"][0] > 1e-2
    de_id = store.query("check_de_identity").filter(model=name)
    assert de_id["n_tokens"].to_list() == [n] and de_id["max_abs_error"].max() < TOL
    ln_id = store.query("check_ln_identity").filter(model=name)
    assert sorted(ln_id["ablation"].to_list()) == ["resample", "zero"] and ln_id["max_abs_error"].max() < TOL
    # The same store extends: the stored neurons_top_k (0) is the run's, so the identity matches.
    again = _invoke(mixtral_dir, tmp_path / "store", "--ablations", "zero", "--top-p", "0.1", "--units", "L1H1",
                    "--quiet")
    assert again.exit_code == 0, again.output


def test_model_architecture_is_read_before_the_load(mixtral_dir):
    from selfrepair.ingest.model_sizes import model_architecture, model_sizes
    from selfrepair.ingest.models import resolve

    spec = resolve(str(mixtral_dir))
    assert model_architecture(spec) == "MixtralForCausalLM" and model_sizes(spec) == (3, T.H)


def test_without_a_readable_config_the_loaded_model_decides(mixtral_dir, tmp_path, monkeypatch):
    """When no config can be read before the load (a model not yet cached, a GGUF file), the same refusals
    and the same switch come after it: the stored configuration is the one the run used."""
    from selfrepair.ingest import runner

    from selfrepair.ingest.model_sizes import model_sizes

    monkeypatch.setattr(runner, "pre_load_facts", lambda spec, revision=None: (model_sizes(spec), None))
    res = _invoke(mixtral_dir, tmp_path / "refused", "--units", "L0H1,MLP2", "--quiet")
    assert res.exit_code != 0 and res.output.strip().splitlines() == [
        "Error: MLP2: Mixtral: its MLP is a mixture of experts, not one MLP, so mlp units are not defined "
        "(head, group and attn units are)"], res.output
    assert not (tmp_path / "refused" / "tiny-mixtral").exists()
    res = _invoke(mixtral_dir, tmp_path / "store", "--ablations", "zero", "--top-p", "0.1", "--units", "L1H1")
    assert res.exit_code == 0 and "note: Mixtral: final-MLP neurons are not defined" in res.output, res.output
    manifest = Store.open(tmp_path / "store").manifest("tiny-mixtral")
    assert manifest.config.raw["neurons_top_k"] == 0 and "mlp_post_final" not in json.dumps(manifest.arrays_json())
    # Extending it: before the load the store's recorded family switches neuron detail off, so the identities match.
    again = _invoke(mixtral_dir, tmp_path / "store", "--ablations", "zero", "--top-p", "0.1", "--units", "L2H1",
                    "--quiet")
    assert again.exit_code == 0, again.output


def test_a_stored_array_list_against_all_is_a_conflict_line(tmp_path):
    """(Found here: a store ingested with a list of arrays, extended with the default `all`, raised a TypeError.
    A dense family: on a mixture of experts `all` is itself a list, without mlp_post_final.)"""
    model_dir = T.save("llama", tmp_path / "models" / "tiny-llama")
    first = _invoke(model_dir, tmp_path / "store", "--ablations", "zero", "--units", "L1H1", "--activations", "z",
                    "--quiet")
    assert first.exit_code == 0, first.output
    res = _invoke(model_dir, tmp_path / "store", "--ablations", "zero", "--units", "L1H1", "--quiet")
    assert res.exit_code != 0 and "Traceback" not in res.output, res.output
    assert res.output.startswith("Error: ") and "(activations: stored ['z'], asked True)" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
