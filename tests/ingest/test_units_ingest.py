"""Units and conditions through the whole ingest: the self-check, extension, resume and the tables.

The engine's numbers are checked against plain transformers in test_unit_engine.py; here the
runner's part: what is planned, stored, extended and checked on every ingest.
"""

from __future__ import annotations

import dataclasses

import polars as pl
import pytest
from click.testing import CliRunner

from selfrepair.cli import main
from selfrepair.queries.store import Store
from tiny_models import ingest_tiny, read_manifest_json

UNITS = "L1H2,mlps,attn,BLOCK1,pair=L0H3+L1H0"
KEY = ["ablation", "sample", "condition", "unit", "token_index"]
TABLES = ("ablation_effects", "ablation_top", "repair_sources", "neuron_effects", "neuron_totals", "attention_top",
          "condition_tokens")


def _table(store_dir, name: str) -> pl.DataFrame:
    df = Store.open(store_dir).sql(f"SELECT * EXCLUDE (model) FROM {name}")
    return df.sort(df.columns)


@pytest.fixture(scope="module")
def one_run(tiny_model_dirs, tmp_path_factory):
    """The final configuration in one run: units alone and given a condition."""
    store = tmp_path_factory.mktemp("units") / "one"
    ingest_tiny(tiny_model_dirs["gpt2"], store, units=UNITS, given=("L0H1",), ablations=("resample", "zero"))
    return store


def test_self_check_covers_a_unit_of_each_kind_and_each_condition(one_run, tiny_model_dirs):
    checks = read_manifest_json(one_run / tiny_model_dirs["gpt2"].name)["self_check"]["deviations"]
    # Each case once, the ablation types in turn, every type at least once (issue 22: a type only
    # changes the replacement the engines are given, so every case under every type repeated paths).
    seen = set()
    for label in ("MLP0", "ATTN0", "BLOCK1", "pair", "L1H2 | L0H1"):
        kinds = [k for k in ("resample", "zero") if f"ablated logit {k} {label}: fast vs full model forward" in checks]
        assert len(kinds) == 1, (label, kinds)
        assert checks[f"ablated logit {kinds[0]} {label}: fast vs full model forward"] < 1e-5
        assert checks[f"d_logit {kinds[0]} {label}: fast vs reference"] < 1e-5
        seen.add(kinds[0])
    assert seen == {"resample", "zero"}


def test_every_unit_is_stored_alone_and_under_its_condition(one_run):
    units = Store.open(one_run).sql(
        "SELECT DISTINCT condition, unit, unit_kind FROM ablation_effects ORDER BY ALL").rows()
    alone = {(u, k) for c, u, k in units if c == ""}
    given = {(u, k) for c, u, k in units if c == "L0H1"}
    assert alone == {("L1H2", "head"), ("MLP0", "mlp"), ("MLP1", "mlp"), ("ATTN0", "attn"), ("ATTN1", "attn"),
                     ("BLOCK1", "block"), ("pair", "group")}
    assert given == alone - {("ATTN0", "attn")}  # `attn`'s ATTN0 holds L0H1: nothing left to ablate on top of it
    out = CliRunner().invoke(main, ["verify", "--store", str(one_run)])
    assert out.exit_code == 0, out.output


def test_extending_unit_by_unit_equals_one_run(one_run, tiny_model_dirs, tmp_path):
    """Heads first, then more units, then the condition: the same rows as the one run, no key twice."""
    store = tmp_path / "steps"
    model = tiny_model_dirs["gpt2"]
    ingest_tiny(model, store, units="L1H2,MLP0,ATTN0", ablations=("resample", "zero"))
    ingest_tiny(model, store, units=UNITS, ablations=("resample",))
    ingest_tiny(model, store, units=UNITS, given=("L0H1",), ablations=("resample", "zero"))
    for name in TABLES:
        a, b = _table(one_run, name), _table(store, name)
        assert a.height > 0 and a.equals(b), name
    key = Store.open(store).sql(f"SELECT {', '.join(KEY)}, count(*) AS n FROM ablation_effects GROUP BY ALL "
                                "HAVING n > 1")
    assert key.height == 0


def test_a_broken_unit_pass_is_refused_by_the_self_check(tiny_model_dirs, tmp_path, monkeypatch):
    from selfrepair.ingest import ablate

    patch = ablate.FastBatch.patch

    def off_for_mlps(self, layer, heads, z_new, u):
        r = patch(self, layer, heads, z_new, u)
        if z_new is None and any(p.mlps for p in heads):
            r = dataclasses.replace(r, logit=r.logit * 1.01)
        return r

    monkeypatch.setattr(ablate.FastBatch, "patch", off_for_mlps)
    store = tmp_path / "s"
    res = CliRunner().invoke(main, ["ingest", "--model", str(tiny_model_dirs["gpt2"]), "--store", str(store),
                                    "--tokens", "62", "--seq-len", "32", "--batch-size", "2", "--corpus", "embedded",
                                    "--ablations", "zero", "--units", "L1H1,MLP1", "--quiet"])
    assert res.exit_code == 1, res.output
    assert res.output.startswith("Error: self-check failed for GPT-2: ") and " zero MLP1: fast vs " in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    assert not store.exists() or not any(store.iterdir())


def test_both_identities_hold_through_sql_for_every_unit_kind(one_run):
    """DESIGN.md's identities through the store's own SQL, on every unit kind, alone and given the condition."""
    s = Store.open(one_run)
    ln = s.query("check_ln_identity")
    assert (ln["max_abs_error"] < 1e-4).all() and (ln["n_unit_rows"] > 0).all() and (ln["n_conditioned_rows"] > 0).all()
    per_kind = s.sql("SELECT unit_kind, condition, max(abs(sr_ln - sr_ln_closed)) AS err, count(*) AS n "
                     "FROM self_repair GROUP BY ALL")
    assert per_kind.height == 10 and (per_kind["err"] < 1e-4).all()  # 5 kinds, alone and given L0H1
    de = s.query("check_de_identity")
    errors = [c for c in de.columns if c.startswith("max_abs_error") or c.endswith("_error")]
    assert errors and all((de[c].drop_nulls() < 1e-4).all() for c in errors), de
    # The condition's run is checked against L0H1's own ablation only where that is stored (not here).
    assert de["max_abs_error"].drop_nulls().len() == de["max_abs_error_units"].drop_nulls().len() == 1, de
