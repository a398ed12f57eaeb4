"""Named queries: header parsing, parameters, and every query running with its defaults."""

from __future__ import annotations

import pytest

from selfrepair.errors import QueryError, UnknownQuery
from selfrepair.queries import named

REQUIRED = {
    "head_top_self_repair", "layer_summary", "layer_trend", "breakdown", "ln_share",
    "ln_ratio_distribution", "head_tokens", "anti_erasure_neurons", "backup_heads",
    "check_de_identity", "check_ln_identity",
}
HEAD = {"layer": 0, "head": 1}


def test_all_required_queries_exist():
    assert REQUIRED <= set(named.all_queries())


@pytest.mark.parametrize("name", sorted(named.all_queries()))
def test_header_and_params(name):
    q = named.all_queries()[name]
    assert q.title and q.description and not q.title.startswith("param")
    assert all(p.help for p in q.params), "every parameter is documented in the header"
    assert {p.name for p in q.params} == set(named.duckdb.extract_statements(q.sql)[0].named_parameters)


@pytest.mark.parametrize("name", sorted(named.all_queries()))
def test_runs_with_defaults(store, name):
    q = named.all_queries()[name]
    args = {k: v for k, v in HEAD.items() if k in {p.name for p in q.params if p.required}}
    df = store.query(name, **args)
    assert "model" in [c.lower() for c in df.columns]


@pytest.mark.parametrize("name", sorted(named.all_queries()))
def test_runs_on_top_tokens(store, spec, name):
    q = named.all_queries()[name]
    names = {p.name for p in q.params}
    args = {k: v for k, v in HEAD.items() if k in names}
    if "p" in names:
        args["p"] = spec.top_p
    assert store.query(name, **args).height > 0


def test_identity_checks(store):
    de = store.query("check_de_identity")
    ln = store.query("check_ln_identity")
    assert sorted(de["model"]) == store.models
    assert de["max_abs_error"].max() < 1e-4
    assert ln["max_abs_error"].max() < 1e-4


def test_head_top_self_repair_matches_view(store, spec):
    df = store.query("head_top_self_repair", p=spec.top_p, ablation="zero")
    k = {m: int(spec.top_p * n) for m, (_, _, n) in spec.models.items()}
    assert all(n == k[m] for m, n in zip(df["model"], df["n_tokens"]))
    assert df.height == sum(l * h for l, h, _ in spec.models.values())
    row = df.filter((df["model"] == "gpt2-tiny") & (df["layer"] == 1) & (df["head"] == 2)).row(0, named=True)
    want = store.sql(
        "SELECT avg(sr) AS sr FROM self_repair_top($p) WHERE model = 'gpt2-tiny' AND layer = 1 "
        "AND head = 2 AND ablation = 'zero'", {"p": spec.top_p})
    assert row["sr"] == pytest.approx(want["sr"][0], abs=1e-12)
    assert row["rel_depth"] == pytest.approx(1 / spec.models["gpt2-tiny"][0])


def test_ln_share_ratio_of_means(store, spec):
    df = store.query("ln_share", p=spec.top_p)
    assert {"ln_share", "ln_share_clipped"} <= set(df.columns)
    layer_rows = df.filter(df["head"].is_null())
    assert (layer_rows["ln_share"] - layer_rows["sr_ln"] / layer_rows["de_clean"]).abs().max() < 1e-12
    assert df["ln_share_clipped"].min() >= 0 and df["ln_share_clipped"].max() <= 1


def test_ln_ratio_distribution_sums_to_one(store, spec):
    df = store.query("ln_ratio_distribution", p=spec.top_p, layer=1, head=0)
    for m in store.models:
        part = df.filter(df["model"] == m)
        assert part["fraction"].sum() == pytest.approx(1.0)
        assert part["n_tokens"].sum() == int(spec.top_p * spec.models[m][2])


def test_missing_parameter_named(store):
    with pytest.raises(QueryError, match="query 'head_tokens' needs parameter 'layer'"):
        store.query("head_tokens", head=0)


def test_unknown_parameter(store):
    with pytest.raises(QueryError, match="has no parameter 'q'"):
        store.query("layer_summary", q=1)


def test_unknown_query_suggests():
    with pytest.raises(UnknownQuery, match=r"^unknown query 'layer_sumary'; known: .*did you mean 'layer_summary'"):
        named.get_query("layer_sumary")


@pytest.mark.parametrize("text, value", [("3", 3), ("-1", -1), ("0.02", 0.02), ("1e-3", 1e-3), ("resample", "resample"), (5, 5)])
def test_coerce(text, value):
    assert named.coerce(text) == value and type(named.coerce(text)) is type(value)


def test_parse_header(tmp_path):
    path = tmp_path / "demo.sql"
    path.write_text(
        "-- Demo title\n-- Line one.\n-- Line two.\n-- param p: 0.5 — a fraction\n-- param k — required one\n"
        "SELECT $k + $p AS x, $extra AS y, '$notaparam' AS z -- $nor_this\n"
    )
    q = named.parse(path)
    assert (q.title, q.description) == ("Demo title", "Line one. Line two.")
    assert [(p.name, p.default, p.help) for p in q.params] == [("p", "0.5", "a fraction"), ("k", None, "required one"), ("extra", None, "")]
    assert q.bind({"k": "2", "extra": "x"}) == {"p": 0.5, "k": 2, "extra": "x"}


def test_parse_rejects_undeclared_use(tmp_path):
    path = tmp_path / "bad.sql"
    path.write_text("-- Bad\n-- param nope: 1 — unused\nSELECT 1\n")
    with pytest.raises(QueryError, match="never uses"):
        named.parse(path)
