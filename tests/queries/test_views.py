"""Views: schema columns plus model, union over models, top-token rule, identities."""

from __future__ import annotations

import math

import numpy as np
import pytest

from selfrepair.errors import StoreNotFound
from selfrepair.queries.store import Store
from selfrepair.store.model_store import ModelStore
from selfrepair.store.schema import TABLES

MODELS = {"gpt2-tiny": (2, 3, 40), "pythia-tiny": (3, 2, 30)}  # as conftest.MODELS (checked below)
TOP_P = 0.1
TOL = 1e-4  # DESIGN.md's tolerance for both identities


def test_models_and_views(store, spec):
    assert (spec.models, spec.top_p) == (MODELS, TOP_P)
    assert store.models == sorted(MODELS)
    assert set(TABLES) | {"models", "self_repair"} == set(store.views)
    assert store.manifest("gpt2-tiny")["model"]["n_layers"] == MODELS["gpt2-tiny"][0]


@pytest.mark.parametrize("table", list(TABLES))
def test_table_view_columns(store, table):
    df = store.sql(f"SELECT * FROM {table} LIMIT 0")
    assert df.columns == ["model"] + TABLES[table].column_names


def test_union_over_models(store):
    df = store.sql("SELECT model, count(*) AS n FROM tokens GROUP BY model ORDER BY model")
    assert df.rows() == [(m, MODELS[m][2]) for m in sorted(MODELS)]


def test_self_repair_columns_and_rows(store):
    df = store.sql("SELECT * FROM self_repair")
    assert df.columns == [
        "model", "ablation", "sample", "layer", "head", "token_index", "de_clean", "de_ablated",
        "d_de", "d_logit", "sr", "sr_heads", "sr_mlps", "sr_ln", "ln_ratio", "sr_ln_closed",
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
    ms.write_manifest({"model": {"name": "x", "n_layers": 1, "n_heads": 1, "d_model": 4, "d_mlp": 4},
                       "n_tokens": 0, "config": {"top_p": 0.02}, "shards": {}})
    with Store.open(tmp_path) as s:
        for table in TABLES:
            df = s.sql(f"SELECT * FROM {table}")
            assert df.height == 0 and df.columns == ["model"] + TABLES[table].column_names
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

    assert selfrepair.Store is Store
