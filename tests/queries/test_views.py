"""Views: schema columns plus model, union over models, top-token rule, identities."""

from __future__ import annotations

import math

import numpy as np
import pytest

from selfrepair.errors import StoreNotFound
from selfrepair.queries.store import Store
from selfrepair.queries.views import view_columns
from selfrepair.store.model_store import ModelStore
from selfrepair.store.schema import TABLES
from selfrepair.store.writer import write_manifest

MODELS = {"gpt2-tiny": (2, 3, 40), "pythia-tiny": (3, 2, 30)}  # as conftest.MODELS (checked below)
TOP_P = 0.1
TOL = 1e-4  # DESIGN.md's tolerance for both identities


def test_models_and_views(store, spec):
    assert (spec.models, spec.top_p) == (MODELS, TOP_P)
    assert store.models == sorted(MODELS)
    assert set(TABLES) | {"models", "inventory", "stored_units", "unit_members", "self_repair",
                          "counterfactual_effects", "repair_channels"} == set(store.views)
    assert store.manifest("gpt2-tiny").model.n_layers == MODELS["gpt2-tiny"][0]


@pytest.mark.parametrize("table", list(TABLES))
def test_table_view_columns(store, table):
    df = store.sql(f"SELECT * FROM {table} LIMIT 0")
    want = ["model"] + TABLES[table].column_names
    if "head" in want and "layer" in want:
        want.insert(want.index("head") + 1, "head_label")  # one head label everywhere
    if "src_head" in want:
        want.insert(want.index("src_head") + 1, "src_label")
    assert df.columns == want


def test_head_labels_name_layer_and_head(store):
    df = store.sql("SELECT layer, head, head_label FROM self_repair UNION ALL "
                   "SELECT layer, head, head_label FROM top_tokens(0.1)")
    assert df.height and all(lab == f"L{la}H{h}" for la, h, lab in df.iter_rows())
    src = store.sql("SELECT src_kind, src_layer, src_head, src_label FROM repair_sources")
    assert src.height and all(lab == (f"MLP{la}" if k == "mlp" else f"L{la}H{h}") for k, la, h, lab in src.iter_rows())


def test_inventory_lists_what_each_model_holds(store):
    inv = store.sql("SELECT * FROM inventory ORDER BY model, ablation, sample")
    assert sorted(set(inv["model"])) == sorted(MODELS)
    for row in inv.iter_rows(named=True):
        layers, heads, tokens = MODELS[row["model"]]
        assert (row["n_tokens"], row["heads"], row["n_heads"]) == (tokens, "all", layers * heads)
        assert row["top_tokens"] == math.floor(row["top_p"] * tokens)
    assert set(inv["ablation"]) == {"resample", "mean", "zero"}


def test_token_context_is_the_row_text_around_a_prediction(store):
    toks = store.sql("SELECT model, row, pos, token_index, token_str, next_token_str FROM tokens ORDER BY model, token_index")
    ctx = store.sql("SELECT * FROM token_context(3) ORDER BY model, token_index")
    assert ctx.height == toks.height
    for model, frame in toks.group_by("model"):
        c = ctx.filter(ctx["model"] == model[0])
        for i, r in enumerate(frame.iter_rows(named=True)):
            same = frame.filter((frame["row"] == r["row"]))
            before = "".join(same.filter((same["pos"] <= r["pos"]) & (same["pos"] > r["pos"] - 3))["token_str"])
            after = "".join(same.filter((same["pos"] > r["pos"]) & (same["pos"] <= r["pos"] + 3))["next_token_str"])
            got = c.row(i, named=True)
            assert (got["before"], got["token"], got["after"]) == (before, r["next_token_str"], after)


def test_union_over_models(store):
    df = store.sql("SELECT model, count(*) AS n FROM tokens GROUP BY model ORDER BY model")
    assert df.rows() == [(m, MODELS[m][2]) for m in sorted(MODELS)]


def test_self_repair_columns_and_rows(store):
    df = store.sql("SELECT * FROM self_repair")
    assert df.columns == [
        "model", "ablation", "sample", "condition", "unit", "unit_kind", "layer", "head", "head_label", "token_index",
        "de_clean", "de_ablated",
        "d_de", "d_logit", "sr", "sr_heads", "sr_mlps", "sr_ln", "ln_ratio", "sr_ln_closed",
        "d_loss", "kl", "d_entropy", "top1_changed",
    ]
    n_abl = store.sql("SELECT count(*) AS n FROM ablation_effects")["n"][0]
    assert df.height == n_abl
    assert np.allclose(df["sr"], df["sr_heads"] + df["sr_mlps"] + df["sr_ln"], atol=1e-12, rtol=0)
    assert np.allclose(df["d_de"], df["de_ablated"] - df["de_clean"], atol=1e-12, rtol=0)


def test_ln_closed_form_holds(store):
    df = store.sql("SELECT max(abs(sr_ln - sr_ln_closed)) AS e FROM self_repair")
    assert df["e"][0] < TOL


@pytest.mark.parametrize("p", [0.05, TOP_P, 0.29, 0.5])
def test_top_tokens_rule(store, p):
    got = store.sql("SELECT model, layer, head, token_index FROM top_tokens($p)", {"p": p})
    heads = store.sql("SELECT model, layer, head, token_index, de FROM head_effects")
    for (model, layer, head), frame in heads.group_by(["model", "layer", "head"]):
        k = math.floor(p * MODELS[model][2])
        want = sorted(zip(frame["de"], frame["token_index"]), key=lambda t: (-t[0], t[1]))[:k]
        mine = got.filter((got["model"] == model) & (got["layer"] == layer) & (got["head"] == head))
        assert sorted(mine["token_index"]) == sorted(i for _, i in want)


def test_top_tokens_has_ties_to_break(store):
    # The fixture rounds DE to 0.1, so the tie rule is actually exercised at the cut.
    df = store.sql(
        "SELECT count(*) AS n FROM (SELECT model, layer, head, de FROM head_effects "
        "GROUP BY ALL HAVING count(*) > 1)"
    )
    assert df["n"][0] > 0


def test_self_repair_top_matches_top_tokens(store):
    a = store.sql("SELECT count(*) AS n FROM self_repair_top($p)", {"p": TOP_P})["n"][0]
    b = store.sql("SELECT count(*) AS n FROM top_tokens($p)", {"p": TOP_P})["n"][0]
    assert a == 2 * b  # two ablations (resample, zero) per top token


def test_missing_table_is_empty_view(tmp_path):
    ms = ModelStore(tmp_path / "empty-model")
    ms.path.mkdir()
    write_manifest(ms, {"model": {"name": "x", "n_layers": 1, "n_heads": 1, "d_model": 4, "d_mlp": 4},
                       "n_tokens": 0, "config": {"top_p": 0.02}, "shards": {}})
    with Store.open(tmp_path) as s:
        for table in TABLES:
            df = s.sql(f"SELECT * FROM {table}")
            assert df.height == 0 and df.columns == ["model"] + view_columns(table)
        assert s.sql("SELECT * FROM self_repair").height == 0


def test_open_missing_store(tmp_path):
    with pytest.raises(StoreNotFound, match="no selfrepair store"):
        Store.open(tmp_path / "nope")
    with pytest.raises(StoreNotFound):
        Store.open(tmp_path)  # exists, but no model folder


def test_open_single_model_folder(store_root):
    with Store.open(store_root / "gpt2-tiny") as s:
        assert s.models == ["gpt2-tiny"]


def test_public_export():
    import selfrepair

    # the query layer's Store with the notebook's unit pages (analysis/notebook.py): every query method is Store's
    assert issubclass(selfrepair.Store, Store) and {"head", "_repr_html_"} <= set(vars(selfrepair.Store))
