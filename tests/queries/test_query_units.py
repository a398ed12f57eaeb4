"""Units and conditions in the views and named queries (issue 20).

- Beside unit and conditioned rows, and over a store written before units (no condition, unit,
  unit_kind or de_base columns), every named query answers exactly as on the head-only store.
- conditional_growth, self_repair's condition baseline, unit top sets and both identity checks,
  against numbers computed here from the raw arrays (never from the views).
"""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import pytest

from conftest import MODELS, TOP_P, make_model
from units_store import ABLATION, CONDITION, add_units, unit_de
from selfrepair.errors import QueryError
from selfrepair.queries import named
from polars.testing import assert_frame_equal

from selfrepair.queries.store import Store
from selfrepair.store.labels import parse_unit, parse_units
from selfrepair.store.schema import METRIC_COLUMNS
from selfrepair.store.top_tokens import top_count, unit_top_sets

MODEL = "gpt2-tiny"
HEAD = {"layer": 1, "head": 2, "unit": "L1H2"}
# Queries of every unit: their answers grow with the unit rows (the unit page's queries, asked for
# the head L1H2 alone, keep theirs).
UNIT_QUERIES = {"conditional_growth", "check_de_identity", "check_ln_identity", "unit_catalog", "fig_unit_breakdown"}


@pytest.fixture(scope="module")
def units(tmp_path_factory):
    """gpt2-tiny of the synthetic store (same seed, same numbers) with unit and conditioned rows added."""
    root = tmp_path_factory.mktemp("units")
    n_layers, n_heads, n_tokens = MODELS[MODEL]
    ms = make_model(root / MODEL, n_layers, n_heads, n_tokens, seed=list(MODELS).index(MODEL))
    raw = add_units(ms)
    with Store.open(root) as s:
        yield s, raw, ms


def _args(name: str) -> dict:
    q = named.all_queries()[name]
    names = {p.name for p in q.params}
    args = {k: v for k, v in HEAD.items() if k in names}
    if "p" in names:
        args["p"] = TOP_P
    return args


def _answer(store: Store, name: str, model: str | None = None):
    """A named query's frame (only `model`'s rows), or the one-line refusal it gives."""
    try:
        df = store.query(name, **_args(name))
    except QueryError as e:  # which head a refusal names first depends on the scan order
        return re.sub(r"L[0-9]+H[0-9]+", "LxHy", str(e))
    return df.filter(pl.col(df.columns[0]) == model) if model else df


def _same(got, want) -> None:
    """The same refusal, or the same rows and values (DuckDB's parallel float sums may add them in
    another order, so values agree to rounding, 1e-12 relative)."""
    if isinstance(want, str):
        assert got == want
    else:
        assert_frame_equal(got, want, check_exact=False, rel_tol=1e-12, abs_tol=1e-15)


# counterfactual_coverage is refused on both (no re-runs), each refusal naming its own store's models.
@pytest.mark.parametrize("name", sorted(set(named.all_queries()) - UNIT_QUERIES - {"counterfactual_coverage"}))
def test_named_queries_keep_their_answers_beside_units(store, units, name):
    """Every per-head query reads head units unconditioned: unit and conditioned rows change nothing."""
    _same(_answer(units[0], name, MODEL), _answer(store, name, MODEL))


@pytest.fixture(scope="module")
def legacy(legacy_root):
    with Store.open(legacy_root) as s:
        yield s


# Columns of the output metrics (and the means over them) in the named queries' answers.
METRIC_ANSWERS = re.compile(r"^(d_loss|kl|d_entropy|top1_changed)(_|$)|_growth")


@pytest.mark.parametrize("name", sorted(named.all_queries()))
def test_a_store_written_before_units_answers_alike(store, legacy, name):
    """Files without condition, unit, unit_kind and de_base read as unconditioned head units. They predate
    the output metrics too: a query that needs them refuses with one line, the others answer alike with
    those columns NULL."""
    got, want = _answer(legacy, name), _answer(store, name)
    if "output_metrics" in named.all_queries()[name].needs:
        assert got == (f"query '{name}' needs the output metrics (d_loss, kl, d_entropy, top1_changed of "
                       "ablation_effects), which the store of gpt2-tiny, pythia-tiny was ingested without "
                       "(--output-metrics none, or a selfrepair before them); ingest that model again with "
                       "--output-metrics all")
        return
    if isinstance(got, pl.DataFrame):
        metric = [c for c in got.columns if METRIC_ANSWERS.search(c) and not c.startswith("d_logit")]
        assert all(got[c].null_count() == got.height for c in metric), name
        got, want = got.drop(metric), want.drop(metric)
    _same(got, want)


def test_legacy_views_fill_the_unit_columns(store, legacy):
    for table in ("ablation_effects", "repair_sources", "neuron_effects", "neuron_totals"):
        q = f"SELECT * EXCLUDE ({', '.join(METRIC_COLUMNS.get(table, ('model',)))}) FROM {table} ORDER BY ALL"
        if table not in METRIC_COLUMNS:
            q = f"SELECT * FROM {table} ORDER BY ALL"
        assert legacy.sql(q).equals(store.sql(q)), table
    # before output metrics: those columns read as NULL
    nulls = legacy.sql("SELECT count(d_loss) + count(kl) + count(d_entropy) + count(top1_changed) AS n, "
                       "count(*) AS rows FROM ablation_effects")
    assert nulls["n"][0] == 0 and nulls["rows"][0] > 0
    row = legacy.sql("SELECT condition, unit, unit_kind, layer, head, de_base FROM ablation_effects "
                     "WHERE layer = 1 AND head = 2 AND token_index = 5 AND ablation = 'zero' AND model = 'gpt2-tiny'")
    de = legacy.sql("SELECT de FROM head_effects WHERE layer = 1 AND head = 2 AND token_index = 5 "
                    "AND model = 'gpt2-tiny'")["de"][0]
    assert row.row(0) == ("", "L1H2", "head", 1, 2, de)


def test_every_ablation_view_names_its_unit_and_condition(units):
    s = units[0]
    for view in ("ablation_effects", "ablation_top", "self_repair", "repair_sources", "neuron_effects",
                 "neuron_totals", "attention_top"):
        assert {"condition", "unit", "unit_kind", "layer", "head"} <= set(s.sql(f"SELECT * FROM {view} LIMIT 0").columns)
    assert s.sql("SELECT * FROM condition_tokens LIMIT 0").columns == [
        "model", "ablation", "sample", "condition", "token_index", "logit", "ln_scale", "loss", "entropy"]
    kinds = s.sql("SELECT DISTINCT unit, unit_kind, layer, head FROM ablation_effects WHERE condition = '' "
                  "AND ablation = 'zero' ORDER BY ALL")
    want = {("ATTN1", "attn", 1, -1), ("BLOCK1", "block", 1, -1), ("MLP0", "mlp", 0, -1),
            ("backup", "group", 1, -1), ("L0H1", "head", 0, 1), ("L1H2", "head", 1, 2)}
    assert want <= set(kinds.iter_rows())


def test_self_repair_of_a_conditioned_unit_uses_the_condition_run(units):
    s, raw, _ = units
    df = s.sql("SELECT token_index, de_clean, d_logit, ln_ratio, sr, sr_ln, sr_ln_closed FROM self_repair "
               "WHERE condition = $c AND unit = 'MLP1' ORDER BY token_index", {"c": CONDITION})
    rows, base = raw[(CONDITION, "MLP1")], raw["condition_run"]
    f32 = lambda x: np.asarray(x, dtype=np.float32).astype(np.float64)  # noqa: E731 - stored as float32
    np.testing.assert_allclose(df["de_clean"], f32(rows["de_base"]), rtol=0, atol=0)
    np.testing.assert_allclose(df["ln_ratio"], f32(base["ln_scale"]) / f32(rows["ln_scale"]), rtol=1e-12)
    np.testing.assert_allclose(df["sr_ln"], df["sr_ln_closed"], rtol=0, atol=1e-5)


def test_identity_checks_cover_unit_rows_and_condition_runs(units):
    s, raw, _ = units
    n_layers, n_heads, n = MODELS[MODEL]
    de = s.query("check_de_identity")
    assert de["max_abs_error"][0] < 1e-5
    # unconditioned rows: the head rows of both ablations and four other units
    assert de["n_unit_rows"][0] == 2 * n_layers * n_heads * n + 4 * n
    assert de["max_abs_error_units"][0] < 1e-5
    assert de["n_condition_rows"][0] == n and de["max_abs_error_conditions"][0] < 1e-5
    ln = s.query("check_ln_identity")
    zero = ln.filter(pl.col("ablation") == ABLATION)
    assert zero["n_unit_rows"][0] == 6 * n  # backup, ATTN1, MLP0, BLOCK1 alone; backup and MLP1 given L0H1
    assert zero["n_conditioned_rows"][0] == 4 * n
    assert ln["max_abs_error"].max() < 1e-5


def _top(values: np.ndarray, k: int) -> set[int]:
    order = np.lexsort((np.arange(len(values)), -values))  # largest first, ties to the lower index
    return set(order[:k].tolist())


def test_conditional_growth_against_independent_numbers(units):
    s, raw, _ = units
    c = raw["clean"]
    n = c["n"]
    f32 = lambda x: np.asarray(x, dtype=np.float32).astype(np.float64)  # noqa: E731
    top = _top(f32(c["head"][0, 1]), top_count(TOP_P, n))  # L0H1's clean DE, as stored
    got = s.query("conditional_growth")
    assert got.columns[:5] == ["model", "ablation", "unit", "unit_kind", "condition"]
    want = []
    for key, rows in raw.items():
        if not isinstance(key, tuple) or not key[0]:
            continue
        cond, label = key
        given = f32(rows["d_logit"])
        alone = f32(raw[("", label)]["d_logit"]) if ("", label) in raw else None
        pick = np.array(sorted(top))
        if alone is None:
            want.append((label, cond, len(pick), None, given[pick].mean(), None, n, None, given.mean(), None))
            continue
        want.append((label, cond, len(pick), alone[pick].mean(), given[pick].mean(),
                     given[pick].mean() - alone[pick].mean(), n, alone.mean(), given.mean(), given.mean() - alone.mean()))
    # MLP1 is not stored alone: its pair has no shared token (NULL means), last in the ranking.
    assert got.height == len(want)
    by_unit = {r["unit"]: r for r in got.iter_rows(named=True)}
    for label, cond, n_top, a_top, g_top, gr_top, n_all, a_all, g_all, gr_all in want:
        r = by_unit[label]
        assert (r["model"], r["ablation"], r["condition"]) == (MODEL, ABLATION, cond)
        if a_top is None:
            assert r["n_top"] == 0 and r["n_all"] == 0 and r["growth_top"] is None
            continue
        assert (r["n_top"], r["n_all"]) == (n_top, n_all)
        for key, value in (("d_logit_alone_top", a_top), ("d_logit_given_top", g_top), ("growth_top", gr_top),
                           ("d_logit_alone", a_all), ("d_logit_given", g_all), ("growth", gr_all)):
            assert r[key] == pytest.approx(value, abs=1e-9), (label, key)
    ranked = [w for w in want if w[5] is not None]
    # Most negative growth first: the unit whose ablation costs the most more logit once the condition is gone.
    assert got["unit"].to_list()[:len(ranked)] == [w[0] for w in sorted(ranked, key=lambda w: w[5])]


def test_conditional_growth_of_the_output_metrics(units):
    """d_loss and kl growth (given − alone), over all shared tokens and over the condition's top tokens."""
    s, raw, _ = units
    c = raw["clean"]
    f32 = lambda x: np.asarray(x, dtype=np.float32).astype(np.float64)  # noqa: E731
    pick = np.array(sorted(_top(f32(c["head"][0, 1]), top_count(TOP_P, c["n"]))))
    by_unit = {r["unit"]: r for r in s.query("conditional_growth").iter_rows(named=True)}
    checked = 0
    for key, rows in raw.items():
        if not isinstance(key, tuple) or not key[0] or ("", key[1]) not in raw:
            continue
        r, alone = by_unit[key[1]], raw[("", key[1])]
        for metric in ("d_loss", "kl"):
            g, a = f32(rows[metric]), f32(alone[metric])
            assert r[f"{metric}_alone"] == pytest.approx(a.mean(), abs=1e-9)
            assert r[f"{metric}_given"] == pytest.approx(g.mean(), abs=1e-9)
            assert r[f"{metric}_growth"] == pytest.approx(g.mean() - a.mean(), abs=1e-9)
            assert r[f"{metric}_growth_top"] == pytest.approx(g[pick].mean() - a[pick].mean(), abs=1e-9)
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("metric", ["d_logit", "d_loss", "kl", "d_entropy", "top1_changed"])
def test_units_by_metric_ranks_every_unit(units, metric):
    """Each unit's means over every token, ranked by the metric (d_logit most negative first, others largest)."""
    s, raw, _ = units
    got = s.query("units_by_metric", metric=metric, ablation=ABLATION).filter(pl.col("model") == MODEL)
    want = {label: np.asarray(rows[metric], dtype=np.float32).astype(np.float64).mean()
            for (cond, label), rows in ((k, v) for k, v in raw.items() if isinstance(k, tuple)) if cond == ""}
    assert sorted(got["unit"].to_list()) == sorted(want)
    for r in got.iter_rows(named=True):
        assert r["value"] == pytest.approx(want[r["unit"]], abs=1e-9) and r["metric"] == metric
        assert r[metric] == pytest.approx(r["value"], abs=0)
    order = sorted(want, key=lambda u: (want[u] if metric == "d_logit" else -want[u], u))
    assert got.sort("rank")["unit"].to_list() == order
    assert got["rank"].to_list() == list(range(1, len(want) + 1))


def test_units_by_metric_refuses_an_unknown_metric(units):
    with pytest.raises(QueryError, match="metric loss is not one of d_logit, d_loss, kl, d_entropy, top1_changed"):
        units[0].query("units_by_metric", metric="loss", ablation=ABLATION)


def test_unit_top_sets_follow_the_unit_de(units):
    s, raw, ms = units
    c = raw["clean"]
    f32 = lambda x: np.asarray(x, dtype=np.float32).astype(np.float64)  # noqa: E731
    k = top_count(TOP_P, c["n"])
    chosen = [parse_unit(x) for x in ("L1H2", "ATTN1", "MLP0", "BLOCK1", "L1H1+L1H2")]
    sets = unit_top_sets(ms, chosen, TOP_P)
    stored = {"head": f32(c["head"]), "mlp": f32(c["mlp"])}
    for u in chosen:
        de = sum((stored["head"][la, h] for la, h in u.heads(c["H"])), np.zeros(c["n"]))
        de = de + sum((stored["mlp"][la] for la in u.mlps()), np.zeros(c["n"]))
        assert set(sets[u.label].tolist()) == _top(de, k), u.label
        assert list(sets[u.label]) == sorted(sets[u.label])
    # The SQL macro agrees with the runner's function, unit by unit (the named group by its stored name).
    sql = s.sql("SELECT unit, token_index FROM unit_top_tokens($p) WHERE model = $m", {"p": TOP_P, "m": MODEL})
    for label in ("ATTN1", "MLP0", "BLOCK1", "L0H1"):
        assert set(sql.filter(pl.col("unit") == label)["token_index"].to_list()) == \
            set(unit_top_sets(ms, [parse_unit(label)], TOP_P)[label].tolist()), label
    backup = set(sql.filter(pl.col("unit") == "backup")["token_index"].to_list())
    assert backup == set(sets["L1H1+L1H2"].tolist())


def test_self_repair_top_of_a_unit_is_its_top_set(units):
    s, raw, ms = units
    got = s.sql("SELECT condition, token_index FROM self_repair_top($p) WHERE unit = 'ATTN1' AND ablation = 'zero'",
                {"p": TOP_P})
    want = set(unit_top_sets(ms, [parse_unit("ATTN1")], TOP_P)["ATTN1"].tolist())
    assert set(got["token_index"].to_list()) == want and set(got["condition"]) == {""}
    # A conditioned unit reads the set of the unit alone.
    got = s.sql("SELECT token_index FROM self_repair_top($p) WHERE unit = 'backup' AND condition = $c",
                {"p": TOP_P, "c": CONDITION})
    assert set(got["token_index"].to_list()) == set(unit_top_sets(ms, [parse_units("backup=L1H1+L1H2")[0]], TOP_P)
                                                   ["backup"].tolist())


def test_stored_units_and_unit_members(units):
    s = units[0]
    got = s.sql("SELECT condition, unit, unit_kind, batches FROM stored_units WHERE ablation = 'zero' "
                "AND condition <> '' ORDER BY unit")
    assert got.rows() == [(CONDITION, "L1H0", "head", 1), (CONDITION, "L1H2", "head", 1),
                          (CONDITION, "MLP1", "mlp", 1), (CONDITION, "backup", "group", 1)]
    members = s.sql("SELECT component, layer, head FROM unit_members WHERE unit = 'BLOCK1' ORDER BY ALL")
    assert members.rows() == [("head", 1, 0), ("head", 1, 1), ("head", 1, 2), ("mlp", 1, -1)]
    assert unit_de  # the fixture's own helper is what the numbers above were built from
