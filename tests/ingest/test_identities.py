"""DESIGN.md's identities, checked through SQL over the written store (not in-memory tensors)."""

import numpy as np
import pytest

from selfrepair import Store

FAMILY_MODELS = ("tiny-gpt2", "tiny-neox", "tiny-llama")
TOL = 1e-4


@pytest.fixture(scope="module")
def store(tiny_store):
    return Store.open(tiny_store)


def test_every_family_is_stored(store):
    assert sorted(store.models) == sorted(FAMILY_MODELS)


def test_direct_effects_sum_to_logit_minus_bias(store):
    df = store.query("check_de_identity")
    assert sorted(df["model"].to_list()) == sorted(FAMILY_MODELS)
    assert all(n == 310 for n in df["n_tokens"])
    assert df["max_abs_error"].max() < TOL


def test_ln_term_equals_closed_form(store):
    df = store.query("check_ln_identity")
    assert len(df) == 3 * 3  # every family × every ablation type
    assert df["max_abs_error"].max() < TOL


def test_self_repair_view_matches_raw_tables_and_ln_closed_form(store):
    # Everything recomputed here from the raw tables, not from the view's own columns:
    # sr = d_logit - (de_abl - de), sr_heads = d_de_heads, sr_mlps = d_de_mlps, and the
    # LayerNorm term's closed form (s/s_abl - 1)·(logit_abl - b_U[y])·s_abl/s. The view's
    # sr_ln is the remainder sr - sr_heads - sr_mlps, so the closed form is the real check.
    df = store.sql("""
        WITH raw AS (
            SELECT a.model, a.ablation, a.sample, a.layer, a.head, a.token_index,
                   a.d_logit::DOUBLE - (a.de::DOUBLE - h.de::DOUBLE) AS sr,
                   a.d_de_heads::DOUBLE AS sr_heads,
                   a.d_de_mlps::DOUBLE AS sr_mlps,
                   (t.ln_scale::DOUBLE / a.ln_scale::DOUBLE - 1)
                       * (t.logit::DOUBLE + a.d_logit::DOUBLE - t.unembed_bias::DOUBLE)
                       * a.ln_scale::DOUBLE / t.ln_scale::DOUBLE AS sr_ln_closed
            FROM ablation_effects a
            JOIN head_effects h USING (model, layer, head, token_index)
            JOIN tokens t USING (model, token_index))
        SELECT r.*, v.sr AS v_sr, v.sr_heads AS v_sr_heads, v.sr_mlps AS v_sr_mlps, v.sr_ln AS v_sr_ln
        FROM raw r JOIN self_repair v USING (model, ablation, sample, layer, head, token_index)
    """)
    n_facts = store.sql("SELECT count(*) AS n FROM ablation_effects")["n"][0]
    assert df.height == n_facts == 3 * 3 * 8 * 310
    for col in ("sr", "sr_heads", "sr_mlps"):
        np.testing.assert_allclose(df[f"v_{col}"].to_numpy(), df[col].to_numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(df["v_sr_ln"].to_numpy(), df["sr_ln_closed"].to_numpy(), rtol=0, atol=TOL)
    # The closed form is not 0 = 0: the final norm's scale really moves under ablation.
    assert np.abs(df["sr_ln_closed"].to_numpy()).max() > 100 * TOL


def test_parallel_last_layer_has_no_downstream_repair(store):
    # GPT-NeoX: the last layer's MLP reads the clean residual and no head comes after.
    df = store.sql(
        "SELECT max(abs(sr_heads)) AS h, max(abs(sr_mlps)) AS m, count(*) AS n FROM self_repair "
        "WHERE model = 'tiny-neox' AND layer = 1"
    )
    assert df["n"][0] == 3 * 4 * 310
    assert df["h"][0] == 0.0 and df["m"][0] == 0.0


def test_sequential_last_layer_repairs_only_through_its_mlp(store):
    df = store.sql(
        "SELECT model, max(abs(sr_heads)) AS h, max(abs(sr_mlps)) AS m FROM self_repair "
        "WHERE layer = 1 AND model IN ('tiny-gpt2', 'tiny-llama') GROUP BY model"
    )
    assert (df["h"] == 0.0).all() and (df["m"] > 1e-3).all()


def test_row_counts_match_the_plan(store):
    df = store.sql(
        "SELECT model, ablation, count(*) AS n, count(DISTINCT (layer, head, token_index)) AS k "
        "FROM ablation_effects GROUP BY ALL"
    )
    assert len(df) == 9
    assert (df["n"] == 8 * 310).all() and (df["k"] == df["n"]).all()


def test_repair_sources_cover_the_top_tokens(store):
    # floor(0.05 * 310) = 15 top tokens per head; each has one row per downstream component.
    df = store.sql(
        "SELECT model, layer, head, count(DISTINCT token_index) AS k FROM repair_sources "
        "WHERE ablation = 'zero' GROUP BY ALL"
    )
    first_layer = df.filter(df["layer"] == 0)
    assert (first_layer["k"] == 15).all() and len(first_layer) == 3 * 4
    top = store.sql(
        "SELECT count(*) AS n FROM top_tokens(0.05) t JOIN repair_sources r USING (model, layer, head, token_index) "
        "WHERE r.ablation = 'zero' AND r.layer = 0 AND r.src_kind = 'mlp' AND r.src_layer = 1"
    )
    assert top["n"][0] == 3 * 4 * 15


def test_repair_sources_sum_to_the_breakdown(store):
    # Σ over downstream heads of d_de = d_de_heads on the same top token (likewise MLPs).
    df = store.sql("""
        SELECT max(abs(s.h - a.d_de_heads)) AS eh, max(abs(s.m - a.d_de_mlps)) AS em FROM (
            SELECT model, ablation, sample, layer, head, token_index,
                   sum(CASE WHEN src_kind = 'head' THEN d_de ELSE 0 END) AS h,
                   sum(CASE WHEN src_kind = 'mlp' THEN d_de ELSE 0 END) AS m
            FROM repair_sources GROUP BY ALL) s
        JOIN ablation_effects a USING (model, ablation, sample, layer, head, token_index)
    """)
    assert df["eh"][0] < TOL and df["em"][0] < TOL


def test_neuron_effects_are_the_top_and_bottom_k_of_the_final_mlp(store):
    # k = 5 at each end of the signed ranking of ΔDE over all d_mlp neurons (d_mlp > 10 here).
    df = store.sql("""
        SELECT model, ablation, layer, head, token_index, count(*) AS n, list(rank ORDER BY rank) AS ranks,
               min(neuron) >= 0 AS ok FROM neuron_effects GROUP BY ALL""")
    assert (df["n"] == 10).all() and df["ok"].all()
    assert set(df["model"]) == set(FAMILY_MODELS)
    d_mlp = {m: store.manifest(m).model.d_mlp for m in FAMILY_MODELS}
    for model, ranks in zip(df["model"], df["ranks"]):
        assert list(ranks) == [1, 2, 3, 4, 5] + list(range(d_mlp[model] - 4, d_mlp[model] + 1))
    # ranks follow the signed change, largest first; every detail token has its totals
    bad = store.sql("""
        SELECT count(*) AS n FROM (
            SELECT rank, de_ablated - de_clean AS d,
                   lag(de_ablated - de_clean) OVER (PARTITION BY model, ablation, sample, layer, head, token_index
                                                    ORDER BY rank) AS prev
            FROM neuron_effects) WHERE prev < d""")
    assert bad["n"][0] == 0
    joined = store.sql("""
        SELECT count(*) AS n, count(t.d_de_sum) AS with_totals,
               max(abs(t.d_de_sum - t.d_de_pos_sum - (t.d_de_sum - t.d_de_abs_sum) / 2)) AS err
        FROM (SELECT DISTINCT model, ablation, sample, layer, head, token_index FROM neuron_effects) e
        LEFT JOIN neuron_totals t USING (model, ablation, sample, layer, head, token_index)""")
    assert joined["n"][0] == joined["with_totals"][0] > 0
    assert joined["err"][0] < TOL  # Σ max(d, 0) = (Σ d + Σ |d|) / 2


@pytest.mark.parametrize("p", [0.05, 0.1])
def test_top_tokens_match_a_window_definition(store, p):
    # p = 0.05 is the ingest's top_p (served from the stored head_top_tokens), 0.1 is computed.
    window = store.sql("""
        SELECT model, layer, head, token_index FROM (
            SELECT h.*, m.n_tokens, row_number() OVER (PARTITION BY h.model, h.layer, h.head
                                                      ORDER BY h.de DESC, h.token_index) AS r
            FROM head_effects h JOIN models m USING (model))
        WHERE r <= floor($p * n_tokens) ORDER BY ALL""", {"p": p})
    macro = store.sql("SELECT model, layer, head, token_index FROM top_tokens($p) ORDER BY ALL", {"p": p})
    assert window.height == 3 * 8 * int(p * 310) and macro.equals(window)
    stored = store.sql("SELECT bool_and(top_stored) AS s FROM models")["s"][0]
    assert stored


def test_ablation_top_is_the_top_token_slice_of_ablation_effects(store):
    """`ablation_top` holds exactly the ablation rows of each head's top tokens (window rule),
    and self_repair_top(p) at the ingest's p, which reads it, equals the full view there."""
    window = """
        SELECT model, layer, head, token_index FROM (
            SELECT h.*, m.n_tokens, row_number() OVER (PARTITION BY h.model, h.layer, h.head
                                                      ORDER BY h.de DESC, h.token_index) AS r
            FROM head_effects h JOIN models m USING (model))
        WHERE r <= floor(0.05 * n_tokens)"""
    cols = "model, ablation, sample, layer, head, token_index, d_logit, ln_scale, de, d_de_heads, d_de_mlps"
    want = store.sql(f"SELECT {cols} FROM ablation_effects JOIN ({window}) USING (model, layer, head, token_index) "
                     "ORDER BY ALL")
    got = store.sql(f"SELECT {cols} FROM ablation_top ORDER BY ALL")
    assert got.height == 3 * 3 * 8 * int(0.05 * 310) and got.equals(want)
    assert store.sql("SELECT bool_and(top_rows_stored) AS s FROM models")["s"][0]
    full = store.sql(f"SELECT s.* FROM self_repair s JOIN ({window}) USING (model, layer, head, token_index) "
                     "ORDER BY model, ablation, sample, layer, head, token_index")
    top = store.sql("SELECT * FROM self_repair_top(0.05) ORDER BY model, ablation, sample, layer, head, token_index")
    assert top.equals(full)


def test_activations_from_python_reproduce_head_effects(store):
    """`Store.activations` labels every dimension, and DEs recomputed from the stored arrays
    and weights toward the true next token reproduce `head_effects` (float16 activations)."""
    import zarr

    from selfrepair.queries.activations import head_de

    for model in FAMILY_MODELS:
        ds = store.activations(model)
        assert ds["z"].dims == ("token_index", "layer", "head", "d_head")
        assert ds["norm"].values[-1] == store.manifest(model).model.norm_names[-1]
        assert ds["vocab_str"].sizes["d_vocab"] == ds["W_U"].sizes["d_vocab"]
        tokens = store.sql("SELECT next_token_id, next_token_str FROM tokens WHERE model = $m ORDER BY token_index",
                           {"m": model})
        assert list(ds["next_token_str"].values) == tokens["next_token_str"].to_list()
        for layer, head in ((0, 1), (1, 3)):
            want = store.sql("SELECT de FROM head_effects WHERE model = $m AND layer = $l AND head = $h "
                             "ORDER BY token_index", {"m": model, "l": layer, "h": head})["de"].to_numpy()
            got = head_de(ds, layer, head, tokens["next_token_id"].to_numpy())
            assert np.max(np.abs(got - want) / np.maximum(1, np.abs(want))) < 1e-3, (model, layer, head)
        arrays = zarr.open_group(str(store.root / model / "activations.zarr"), mode="r")
        assert arrays["z"].metadata.dimension_names == ("token_index", "layer", "head", "d_head")
        assert arrays["z"].attrs["doc"] and arrays["weights/W_O"].attrs["doc"]


def test_attention_top_matches_plain_transformers(store, tiny_model_dirs):
    """`attention_top` against the model's own eager attention probabilities, recomputed with
    transformers only: for each ablated head's top tokens, the 8 largest weights over the
    positions the query sees, in order, the same rows in every draw."""
    import torch
    from transformers import AutoModelForCausalLM

    from tiny_models import rows_from_store

    for family in ("gpt2", "llama"):
        model = f"tiny-{family}"
        man = store.manifest(model)
        seq = man.seq_len
        rows = rows_from_store(store, model, man.n_rows, seq)
        hf = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family], attn_implementation="eager").eval()
        with torch.no_grad():
            pattern = hf(rows, output_attentions=True, use_cache=False).attentions
        got = store.sql("SELECT ablation, layer, head, token_index, rank, src_pos, src_token_index, weight "
                        "FROM attention_top WHERE model = $m ORDER BY ALL", {"m": model})
        tops = store.sql("SELECT layer, head, token_index FROM top_tokens(0.05) WHERE model = $m", {"m": model})
        assert got.height and set(got["ablation"]) == {"resample", "mean", "zero"}
        per_draw = got.filter(got["ablation"] == "zero").drop("ablation")
        assert per_draw.equals(got.filter(got["ablation"] == "mean").drop("ablation"))  # same rows every draw
        assert per_draw.select("layer", "head", "token_index").unique().height == tops.height
        preds = seq - 1
        for layer, head, tok in tops.sample(20, seed=0).iter_rows():
            r, q = divmod(tok, preds)
            w = pattern[layer][r, head, q, : q + 1].double()
            want_w, want_src = w.sort(descending=True)
            k = min(8, q + 1)
            mine = per_draw.filter((per_draw["layer"] == layer) & (per_draw["head"] == head)
                                   & (per_draw["token_index"] == tok)).sort("rank")
            assert mine["rank"].to_list() == list(range(1, k + 1))
            assert np.allclose(mine["weight"].to_numpy(), want_w[:k].numpy(), atol=1e-6)
            assert (mine["src_token_index"] - mine["src_pos"] == r * preds).all()
            # Positions agree wherever the weights are not tied.
            assert set(mine["src_pos"].to_list()) == set(want_src[:k].tolist()) or \
                np.isclose(want_w[k - 1].item(), want_w[k].item() if k < q + 1 else -1)
