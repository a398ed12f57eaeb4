"""Named queries: header parsing, parameters, every query running with its defaults, and the
numbers, row counts and order of the main ones against an independent Polars computation.

The expected values are rebuilt from the raw tables (tokens, head_effects, ablation_effects,
repair_sources, neuron_effects) with Polars, never from the views or macros the queries
use, so a wrong join, filter, top-token rule, mean or order shows up.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from selfrepair.errors import QueryError, UnknownQuery
from selfrepair.queries import named

REQUIRED = {
    "head_top_self_repair", "layer_summary", "layer_trend", "breakdown", "ln_share",
    "ln_ratio_distribution", "head_tokens", "anti_erasure_neurons", "backup_heads",
    "check_de_identity", "check_ln_identity",
}
HEAD = {"layer": 0, "head": 1, "unit": "L0H1"}  # `unit`: the unit queries take the head as a unit
# The authors' second token set (top sr_mlps): this store has no neuron rows for it, so they refuse.
SR_MLPS_QUERIES = {"paper_anti_erasure_top_neuron", "paper_neuron_top_frequency", "paper_top_neurons_share"}


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
    if "p" in {p.name for p in q.params}:
        args["p"] = 0.1  # the default 0.02 keeps no token of these 30- and 40-token models (refused)
    if name in SR_MLPS_QUERIES:
        with pytest.raises(QueryError, match="no neuron rows; ingest them with `selfrepair ingest --sr-mlps-neurons"):
            store.query(name, **args)
        return
    if name == "counterfactual_coverage":  # this store has no re-runs (test_a_query_on_counterfactuals_…)
        return
    df = store.query(name, **args)
    assert "model" in [c.lower() for c in df.columns]


@pytest.mark.parametrize("params,message", [
    (dict(ablation="Zero"), "ablation 'Zero' was not ingested; this store has: mean, resample, zero"),
    (dict(p=2), "p = 2 is outside (0, 1]"),
    (dict(p=-1), "p = -1 is outside (0, 1]"),
    (dict(p=0), "p = 0 is outside (0, 1]"),
    (dict(p=0.02), "p = 0.02 keeps no token: floor(p × 40 tokens) = 0"),
    (dict(sample=1), "resample draw 1 was not ingested; stored draws: 0"),
    (dict(ablation="zero", sample=1), "zero draw 1 was not ingested"),
    (dict(head="L9H0"), "layer 9 is not a layer of"),
    (dict(head="L0H7"), "head 7 is not a head index of"),
    (dict(head="0H1"), "head '0H1': use a label like L26H6"),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_a_request_for_what_was_not_ingested_is_refused(store, params, message):
    """An empty answer is never silent: each of these would otherwise print (0 rows)."""
    base = {"head": 1, "p": 0.1} if isinstance(params.get("head"), str) else {"layer": 0, "head": 1, "p": 0.1}
    with pytest.raises(QueryError) as e:
        store.query("head_tokens", **(base | params))
    assert message in str(e.value)


# This store holds no condition and no unit but heads: conditional_growth runs on one that does
# (test_query_units.py), fig_unit_breakdown on an ingested one (tests/analysis/test_unit_pages.py);
# nor counterfactual re-runs: head_repair_channels and counterfactual_coverage run on a store with them
# (tests/ingest/test_counterfactual.py); here counterfactual_coverage is refused.
@pytest.mark.parametrize("name", sorted(set(named.all_queries()) - SR_MLPS_QUERIES
                                        - {"conditional_growth", "fig_unit_breakdown", "head_repair_channels",
                                           "counterfactual_coverage"}))
def test_runs_on_top_tokens(store, spec, name):
    q = named.all_queries()[name]
    names = {p.name for p in q.params}
    args = {k: v for k, v in HEAD.items() if k in names}
    if "p" in names:
        args["p"] = spec.top_p
    assert store.query(name, **args).height > 0


def test_a_query_on_counterfactuals_is_refused_without_them(store):
    with pytest.raises(QueryError) as e:
        store.query("counterfactual_coverage")
    assert "needs counterfactual re-runs (counterfactual_runs)" in str(e.value)
    assert "ingest that model again with --counterfactuals frozen-norms,frozen-attention" in str(e.value)


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


def test_rows_sort_and_cut_a_named_query(store):
    from selfrepair.queries.store import Rows

    full = store.query("layer_summary", p=0.1)
    top = store.query("layer_summary", Rows(limit=2, sort="sr", desc=True), p=0.1)
    assert top.equals(full.sort("sr", descending=True).head(2))
    # `limit` without Rows stays a query parameter (backup_heads's own $limit).
    assert store.query("backup_heads", Rows(limit=1), layer=0, head=1, limit=3).height == 1


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


# -- values against an independent computation ------------------------------------------
P = 0.1  # the synthetic store's top_p
MODELS = {"gpt2-tiny": (2, 3, 40), "pythia-tiny": (3, 2, 30)}  # as tests/queries/conftest.py builds them
TOL = 1e-9  # both sides are float64 sums of the same float32 values
F64 = pl.Float64


def _raw(store, table: str) -> pl.DataFrame:
    return store.sql(f"SELECT * FROM {table}")


@pytest.fixture(scope="module")
def raw(store):
    return {t: _raw(store, t) for t in ("tokens", "head_effects", "ablation_effects", "repair_sources",
                                        "neuron_effects")}


def _top(raw, p=P) -> pl.DataFrame:
    """Each head's floor(p·N) tokens by signed clean DE, ties to the lower token_index."""
    n = pl.DataFrame({"model": list(MODELS), "k": [int(np.floor(p * t)) for _, _, t in MODELS.values()]})
    h = raw["head_effects"].join(n, on="model").sort(["model", "layer", "head", "de", "token_index"],
                                                     descending=[False, False, False, True, False])
    return h.filter(pl.int_range(pl.len()).over(["model", "layer", "head"]) < pl.col("k")).select(
        "model", "layer", "head", "token_index")


def _facts(raw, top: bool) -> pl.DataFrame:
    a = raw["ablation_effects"]
    if top:
        a = a.join(_top(raw), on=["model", "layer", "head", "token_index"])
    h = raw["head_effects"].rename({"de": "de_clean"})
    t = raw["tokens"].select("model", "token_index", pl.col("ln_scale").alias("s"), "logit", "unembed_bias")
    f = a.join(h, on=["model", "layer", "head", "token_index"]).join(t, on=["model", "token_index"])
    de_abl, de_cl = pl.col("de").cast(F64), pl.col("de_clean").cast(F64)
    return f.select(
        "model", "ablation", "sample", "layer", "head", "token_index",
        de_cl.alias("de_clean"), de_abl.alias("de_ablated"), (de_abl - de_cl).alias("d_de"),
        pl.col("d_logit").cast(F64),
        (pl.col("d_logit").cast(F64) - (de_abl - de_cl)).alias("sr"),
        pl.col("d_de_heads").cast(F64).alias("sr_heads"), pl.col("d_de_mlps").cast(F64).alias("sr_mlps"),
        (pl.col("d_logit").cast(F64) - (de_abl - de_cl) - pl.col("d_de_heads").cast(F64)
         - pl.col("d_de_mlps").cast(F64)).alias("sr_ln"),
        (pl.col("s").cast(F64) / pl.col("ln_scale").cast(F64)).alias("ln_ratio"),
        *[pl.col(c).cast(F64) for c in METRICS],
    )


def assert_same(got: pl.DataFrame, want: pl.DataFrame, tol: float = TOL) -> None:
    """Same columns in order, same rows in the same order, numbers to `tol` (the confidence intervals'
    *_ci_low/*_ci_high columns aside: tests/queries/test_bootstrap.py checks them)."""
    got = got.select([c for c in got.columns if not c.endswith(("_ci_low", "_ci_high"))])
    assert got.columns == want.columns
    assert got.height == want.height > 0
    for col in got.columns:
        g, w = got[col], want[col]
        if g.dtype.is_float() or w.dtype.is_float():
            np.testing.assert_allclose(g.cast(F64).to_numpy(), w.cast(F64).to_numpy(), rtol=0, atol=tol,
                                       err_msg=col)
        else:
            assert g.cast(w.dtype).to_list() == w.to_list(), col


def _means(facts, keys, cols):
    return facts.group_by(keys).agg([pl.len().cast(pl.Int64).alias("n_tokens")] + [pl.col(c).mean() for c in cols])


def _sel(raw, ablation="zero", top=True):
    f = _facts(raw, top)
    return f.filter((pl.col("ablation") == ablation) & (pl.col("sample") == 0))


ALL = ["de_clean", "de_ablated", "d_logit", "sr", "sr_heads", "sr_mlps", "sr_ln"]
METRICS = ["d_loss", "kl", "d_entropy", "top1_changed"]  # output metrics (top1_changed: the fraction that flips)


def test_head_top_self_repair(store, raw):
    got = store.query("head_top_self_repair", p=P, ablation="zero")
    f = _sel(raw)
    want = _means(f, ["model", "layer", "head"], ALL + ["ln_ratio"] + METRICS).join(
        pl.DataFrame({"model": list(MODELS), "nl": [l for l, _, _ in MODELS.values()]}), on="model")
    want = want.with_columns((pl.col("layer") / pl.col("nl")).alias("rel_depth")).sort("model", "layer", "head")
    assert_same(got, want.select("model", "layer", "head", "rel_depth", "n_tokens", *ALL, "ln_ratio", *METRICS))
    assert got.height == sum(l * h for l, h, _ in MODELS.values())


def test_layer_summary(store, raw):
    got = store.query("layer_summary", p=P, ablation="zero")
    f = _sel(raw)
    want = f.group_by("model", "layer").agg(
        pl.col("head").n_unique().cast(pl.Int64).alias("n_heads"), pl.len().cast(pl.Int64).alias("n_tokens"),
        pl.col("de_clean").mean().alias("de"), pl.col("d_logit").mean(), pl.col("sr").mean(), pl.col("sr_ln").mean(),
    ).sort("model", "layer")
    assert_same(got, want)
    assert got.height == sum(l for l, _, _ in MODELS.values())


@pytest.mark.parametrize("ablation", ["resample", "zero"])
def test_breakdown(store, raw, ablation):
    got = store.query("breakdown", p=P, ablation=ablation)
    parts = ["sr", "sr_heads", "sr_mlps", "sr_ln"]
    want = _means(_sel(raw, ablation), ["model", "layer"], ["de_clean"] + parts).sort("model", "layer")
    shares = {"sr": "sr_share", "sr_heads": "heads_share", "sr_mlps": "mlps_share", "sr_ln": "ln_share"}
    want = want.with_columns([(pl.col(c) / pl.col("de_clean")).alias(s) for c, s in shares.items()])
    assert_same(got, want.select("model", "layer", "n_tokens", "de_clean", *parts, *shares.values()))


@pytest.mark.parametrize("name", ["fig_layer_breakdown", "table_layer_breakdown"])
def test_layer_breakdowns(store, raw, name):
    got = store.query(name, p=P, ablation="zero")
    want = _means(_sel(raw), ["model", "layer"], ALL).sort("model", "layer")
    if name == "table_layer_breakdown":
        want = want.with_columns([pl.col(c).round(4) for c in ALL] + [
            (100 * pl.col("sr_ln") / pl.col("de_clean")).round(1).alias("LN share (%)")])
        got = got.rename(dict(zip(got.columns[:10], ["model", "layer", "n_tokens"] + ALL)))
        # Rounded in SQL to 4 decimals (the share to 1): half a unit of the last digit.
        assert_same(got.drop("LN share (%)"), want.select("model", "layer", "n_tokens", *ALL), tol=5e-5 + 1e-12)
        np.testing.assert_allclose(got["LN share (%)"].to_numpy(), want["LN share (%)"].to_numpy(), rtol=0,
                                   atol=0.05 + 1e-9)
        return
    assert_same(got, want.select("model", "layer", "n_tokens", *ALL))


def test_table_head_breakdown(store, raw):
    got = store.query("table_head_breakdown", p=P, ablation="zero")
    want = _means(_sel(raw), ["model", "layer", "head"], ALL).sort("model", "layer", "head")
    assert got["Head"].to_list() == [f"L{l}H{h}" for l, h in zip(want["layer"], want["head"])]
    assert got["Tokens"].to_list() == want["n_tokens"].to_list()
    for col, name in zip(ALL, ["DE", "Ablated DE", "Logit change", "Self-repair", "Heads", "MLPs", "LayerNorm"]):
        np.testing.assert_allclose(got[name].to_numpy(), want[col].to_numpy(), rtol=0, atol=5e-5 + 1e-12)
    np.testing.assert_allclose(got["LN share (%)"].to_numpy(),
                               (100 * want["sr_ln"] / want["de_clean"]).to_numpy(), rtol=0, atol=0.05 + 1e-9)


def test_layer_trend(store, raw):
    got = store.query("layer_trend", p=P, ablation="resample")
    f = _sel(raw, "resample")
    nl = pl.DataFrame({"model": list(MODELS), "nl": [l for l, _, _ in MODELS.values()]})
    want = _means(f, ["model", "layer"], ["de_clean", "d_de", "sr"]).join(nl, on="model").sort("model", "layer")
    want = want.select("model", "layer", (pl.col("layer") / pl.col("nl")).alias("rel_depth"), "n_tokens", "de_clean",
                       (-pl.col("d_de")).alias("lost_de"), "sr", (pl.col("sr") / -pl.col("d_de")).alias("repair_fraction"))
    assert_same(got, want)


def test_ln_share_per_head_and_layer(store, raw):
    got = store.query("ln_share", p=P, ablation="zero")
    f = _sel(raw).with_columns(
        (pl.col("sr_ln") / pl.col("de_clean")).clip(0, 1).alias("clipped"))
    agg = [pl.len().cast(pl.Int64).alias("n_tokens"), pl.col("de_clean").mean(), pl.col("sr_ln").mean(),
           (pl.col("sr_ln").mean() / pl.col("de_clean").mean()).alias("ln_share"),
           pl.col("clipped").mean().alias("ln_share_clipped")]
    heads = f.group_by("model", "layer", "head").agg(agg)
    layers = f.group_by("model", "layer").agg(agg).with_columns(pl.lit(None, pl.Int64).alias("head"))
    want = pl.concat([heads.with_columns(pl.col("head").cast(pl.Int64)), layers.select(heads.columns)])
    want = want.sort("model", "layer", "head", nulls_last=True).select(got.columns)
    assert_same(got, want)


def test_model_spec_matches_the_fixture(spec):
    assert spec.models == MODELS and spec.top_p == P


def test_fig_head_de_vs_dlogit_over_all_tokens(store, raw):
    got = store.query("fig_head_de_vs_dlogit", ablation="resample")
    f = _sel(raw, "resample", top=False)
    want = _means(f, ["model", "layer", "head"], ["de_clean", "d_logit", "d_de", "sr"]).sort("model", "layer", "head")
    assert_same(got, want)
    assert set(want["n_tokens"]) == {n for _, _, n in MODELS.values()}


def test_fig_resample_spread(store, raw):
    got = store.query("fig_resample_spread", p=P)
    f = _facts(raw, True).filter(pl.col("ablation") == "resample")
    want = _means(f, ["model", "layer", "head", "sample"], ["de_clean", "sr"]).sort("model", "layer", "head", "sample")
    # One draw: every token is common to the draws (none dropped), and the mean over draws is the draw's.
    want = want.with_columns(pl.lit(0, pl.Int64).alias("n_dropped"), pl.col("sr").alias("sr_draws"))
    assert_same(got, want)


def test_head_tokens(store, raw):
    got = store.query("head_tokens", layer=1, head=1, p=P, ablation="zero")
    f = _sel(raw, top=False).filter((pl.col("layer") == 1) & (pl.col("head") == 1))
    top = _top(raw).filter((pl.col("layer") == 1) & (pl.col("head") == 1)).with_columns(pl.lit(True).alias("is_top"))
    t = raw["tokens"].select("model", "token_index", "row", "pos", "token_str", "next_token_str")
    want = f.join(t, on=["model", "token_index"]).join(top, on=["model", "layer", "head", "token_index"], how="left")
    want = want.with_columns(pl.col("is_top").fill_null(False)).sort(
        ["model", "de_clean", "token_index"], descending=[False, True, False]).select(got.columns)
    assert_same(got, want)
    assert got["is_top"].sum() == sum(int(P * n) for _, _, n in MODELS.values())


def test_backup_heads(store, raw):
    got = store.query("backup_heads", layer=0, head=1, ablation="zero", limit=3)
    r = raw["repair_sources"].filter((pl.col("layer") == 0) & (pl.col("head") == 1) & (pl.col("ablation") == "zero")
                                     & (pl.col("sample") == 0))
    r = r.join(raw["head_effects"], on=["model", "layer", "head", "token_index"])
    g = r.group_by("model", "src_kind", "src_layer", "src_head").agg(
        pl.len().cast(pl.Int64).alias("n_tokens"), pl.col("d_de").cast(F64).mean(),
        (pl.col("d_de").cast(F64).mean() / pl.col("de").cast(F64).mean()).alias("share"))
    g = g.with_columns(pl.when(pl.col("d_de") >= 0).then(pl.lit("repairs")).otherwise(pl.lit("works against"))
                       .alias("direction"), pl.col("d_de").abs().alias("size"))
    g = g.with_columns(pl.col("d_de").sum().over("model", "direction").alias("direction_total"))
    g = g.sort(["model", "direction", "size", "src_layer", "src_head"], descending=[False, False, True, False, False])
    g = g.with_columns((pl.int_range(pl.len()).over("model", "direction") + 1).alias("rank")).filter(pl.col("rank") <= 3)
    g = g.with_columns(pl.when(pl.col("src_kind") == "mlp").then(pl.format("MLP{}", "src_layer"))
                       .otherwise(pl.format("L{}H{}", "src_layer", "src_head")).alias("component"))
    assert_same(got, g.select(got.columns))
    assert set(got["direction"]) == {"repairs", "works against"}  # both signs are shown
    assert got.equals(store.query("backup_heads", head="L0H1", ablation="zero", limit=3))  # one head label


def test_anti_erasure_neurons(store, raw):
    got = store.query("anti_erasure_neurons", layer=1, head=0, ablation="resample")
    n = raw["neuron_effects"].filter((pl.col("layer") == 1) & (pl.col("head") == 0)
                                     & (pl.col("ablation") == "resample") & (pl.col("sample") == 0))
    rep = pl.col("de_ablated").cast(F64) - pl.col("de_clean").cast(F64)
    g = n.group_by("model", "neuron").agg(
        pl.len().cast(pl.Int64).alias("n_tokens"), pl.col("de_clean").cast(F64).mean(), rep.mean().alias("mean_repair"),
        rep.sum().alias("total_repair"),
        ((pl.col("de_clean") < 0) & (rep > 0)).sum().cast(pl.Int64).alias("n_anti_erasure"))
    g = g.sort(["model", "total_repair", "neuron"], descending=[False, True, False])
    g = g.with_columns((pl.int_range(pl.len()).over("model") + 1).alias("rank"))
    assert_same(got, g.select(got.columns), tol=1e-6)  # float32 sums in SQL (no cast in the query)


def test_ln_ratio_distribution(store, raw):
    got = store.query("ln_ratio_distribution", p=P, ablation="zero", layer=1, head=0, bin_width=0.05)
    f = _sel(raw).filter((pl.col("layer") == 1) & (pl.col("head") == 0))
    bins = f.with_columns((pl.col("ln_ratio") / 0.05).floor().alias("bin")).group_by("model", "bin").agg(
        pl.len().cast(pl.Int64).alias("n_tokens"))
    above = f.group_by("model").agg((pl.col("ln_ratio") > 1).cast(F64).mean().alias("share_above_1"))
    want = bins.join(above, on="model").with_columns(
        (pl.col("bin") * 0.05).alias("bin_lo"), ((pl.col("bin") + 1) * 0.05).alias("bin_hi"),
        (pl.col("n_tokens") / pl.col("n_tokens").sum().over("model")).alias("fraction")).sort("model", "bin_lo")
    assert_same(got, want.select(got.columns))


@pytest.fixture(scope="module")
def damaged(store_root, tmp_path_factory):
    """A copy of one synthetic model with one token's de_other off by 0.5 and one ablation
    fact's d_de_mlps off by 0.25: the identity checks must report exactly those errors."""
    from selfrepair.queries.store import Store

    import shutil

    from selfrepair.store.model_store import ModelStore

    root = tmp_path_factory.mktemp("damaged")
    shutil.copytree(store_root / "gpt2-tiny", root / "gpt2-tiny")
    ms = ModelStore(root / "gpt2-tiny")
    manifest = ms.manifest()
    for shard, table, col, row, delta in (("clean-0000", "tokens", "de_other", 7, 0.5),
                                          ("ablation-0000", "ablation_effects", "d_de_mlps", 11, 0.25)):
        path = ms.path / manifest.shards[shard].files[table].path
        t = pq.read_table(path)
        values = t.column(col).to_numpy().copy()
        values[row] += delta
        t = t.set_column(t.schema.get_field_index(col), t.schema.field(col), pl.Series(values).to_arrow().cast(
            t.schema.field(col).type))
        pq.write_table(t, path)
    with Store.open(root) as s:
        yield s


def test_check_de_identity_reports_the_error(store, damaged, raw):
    clean = store.query("check_de_identity")
    assert clean["model"].to_list() == sorted(MODELS) and clean["n_tokens"].to_list() == [
        MODELS[m][2] for m in sorted(MODELS)]
    assert clean["max_abs_error"].max() < 1e-5
    got = damaged.query("check_de_identity")
    assert got["model"].to_list() == ["gpt2-tiny"] and got["n_tokens"][0] == MODELS["gpt2-tiny"][2]
    assert got["max_abs_error"][0] == pytest.approx(0.5, abs=1e-5)


def test_check_ln_identity_reports_the_error(store, damaged):
    clean = store.query("check_ln_identity")
    assert list(zip(clean["model"], clean["ablation"])) == [(m, a) for m in sorted(MODELS) for a in ("resample", "zero")]
    assert clean["n_rows"].to_list() == [l * h * n for m in sorted(MODELS) for l, h, n in [MODELS[m]] * 2]
    assert clean["max_abs_error"].max() < 1e-5
    got = damaged.query("check_ln_identity")
    errors = dict(zip(got["ablation"], got["max_abs_error"]))
    # Row 11 of the ablation shard is a resample fact; zero ablation is untouched.
    assert errors["resample"] == pytest.approx(0.25, abs=1e-5) and errors["zero"] < 1e-5
