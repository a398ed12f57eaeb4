"""The confidence-interval columns (issue 22): a seeded Poisson bootstrap over rows, checked against an
independent numpy implementation of the same scheme with the same seed (queries/bootstrap.py documents
it: a 32-bit integer hash of (seed, kind, replicate, key) as the uniform, the Poisson(1) inverse CDF as
the weight, ratio-of-weighted-sums means, linear-interpolation percentiles), plus properties: the
interval holds the mean, a lower level gives a narrower interval, and the seed is honoured.

Reads the synthetic two-model store of tests/queries/conftest.py (no ingest).
"""

from __future__ import annotations

import math
import re

import numpy as np
import polars as pl
import pytest

from selfrepair.errors import QueryError

P = 0.1
N_BOOT = 50


def _uniform(seed: int, kind: int, b: int, key: int) -> float:
    """The hash with Python's unbounded integers (no numpy, no project code)."""
    m = 1 << 32
    x = ((((seed % m) * 1_000_003 + kind) % m * 1_000_033 + b) % m * 999_983 + key) % m
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) % m
    return ((x >> 16) ^ x) / m


def _poisson(u: float) -> int:
    """Poisson(1) inverse CDF by its recurrence p_k = p_{k-1} / k."""
    k, p = 0, math.exp(-1)
    cdf = p
    while u >= cdf and k < 15:
        k += 1
        p /= k
        cdf += p
    return k


def _ci(per_row: pl.DataFrame, column: str, seed: int, level: float) -> tuple[float, float]:
    """One group's interval from its per-row sums (`row`, `n`, `column`)."""
    rows, n, s = (per_row[c].to_numpy() for c in ("row", "n", column))
    means = []
    for b in range(N_BOOT):
        w = np.array([_poisson(_uniform(seed, 0, b, int(r))) for r in rows])
        if (w * n).sum() > 0:
            means.append((w * s).sum() / (w * n).sum())
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])  # numpy's default: linear
    return float(lo), float(hi)


def _facts(store) -> pl.DataFrame:
    return store.sql("SELECT s.model, s.layer, s.head, t.row, s.sr, s.d_logit FROM self_repair_top($p) s "
                     "JOIN tokens t USING (model, token_index) WHERE s.ablation = 'zero' AND s.sample = 0 "
                     "AND s.condition = '' AND s.unit_kind = 'head'", {"p": P})


@pytest.mark.parametrize("seed, level", [(0, 0.95), (7, 0.8)])
def test_layer_intervals_equal_an_independent_bootstrap(store, seed, level):
    got = store.query("layer_summary", p=P, ablation="zero", seed=seed, level=level, n_boot=N_BOOT)
    facts = _facts(store)
    for r in got.iter_rows(named=True):
        group = facts.filter((pl.col("model") == r["model"]) & (pl.col("layer") == r["layer"]))
        per_row = group.group_by("row").agg(pl.len().alias("n"), pl.col("sr").sum(), pl.col("d_logit").sum())
        for column in ("sr", "d_logit"):
            lo, hi = _ci(per_row.sort("row"), column, seed, level)
            assert math.isclose(r[f"{column}_ci_low"], lo, rel_tol=0, abs_tol=1e-9), (r["layer"], column)
            assert math.isclose(r[f"{column}_ci_high"], hi, rel_tol=0, abs_tol=1e-9), (r["layer"], column)


def test_head_intervals_hold_the_mean_and_narrow_with_the_level(store):
    wide = store.query("head_top_self_repair", p=P, ablation="zero", level=0.95)
    narrow = store.query("head_top_self_repair", p=P, ablation="zero", level=0.5)
    for column in ("de_clean", "de_ablated", "d_logit", "sr", "sr_heads", "sr_mlps", "sr_ln"):
        lo, hi, mean = wide[f"{column}_ci_low"], wide[f"{column}_ci_high"], wide[column]
        slack = 1e-9 + 1e-6 * mean.abs()  # a group of one row: every replicate is the mean itself
        assert ((lo <= mean + slack) & (mean - slack <= hi)).all(), column
        assert ((narrow[f"{column}_ci_low"] >= lo - 1e-12) & (narrow[f"{column}_ci_high"] <= hi + 1e-12)).all()


def test_the_seed_is_honoured(store):
    a = store.query("layer_summary", p=P, ablation="zero", seed=1)
    assert a.equals(store.query("layer_summary", p=P, ablation="zero", seed=1))
    b = store.query("layer_summary", p=P, ablation="zero", seed=2)
    assert not a["sr_ci_low"].equals(b["sr_ci_low"])


@pytest.mark.parametrize("params, message", [
    ({"level": 1.0}, "level = 1.0 is outside (0, 1)"),
    ({"seed": -1}, "seed = -1: the bootstrap's seed is an integer >= 0"),
    ({"n_boot": 0}, "n_boot = 0: bootstrap replicates must be an integer in [1, 10000]"),
])
def test_bad_interval_settings_are_one_line(store, cli, store_root, params, message):
    with pytest.raises(QueryError, match="^" + re.escape(message)):
        store.query("layer_summary", p=P, ablation="zero", **params)
    from click.testing import CliRunner

    (key, value), = params.items()
    res = CliRunner().invoke(cli, ["query", "layer_summary", "-p", f"{key}={value}", "-p", "ablation=zero",
                                   "--store", str(store_root)])
    assert res.exit_code == 1 and res.output.splitlines()[-1].startswith(f"Error: {message}")
