"""Confidence intervals by a seeded Poisson bootstrap over rows (and resample draws), in SQL.

Tokens of one row share their context, so they are not independent: the unit of resampling is the
row. Each bootstrap replicate b gives every stored row r a weight w(b, r) ~ Poisson(1) (the Poisson
bootstrap: Hanley & MacGibbon 2006; Chamandy et al. 2012), and a replicate's mean of x over a set of
tokens is Σ_r w·Σ_{tokens of r} x / Σ_r w·n_r, a ratio of weighted per-row sums. A named query
therefore aggregates its tokens to per-row sums and counts once, takes their dot products with each
replicate's weights (`boot_row_weights`) and the percentiles of the replicates' means: `*_ci_low` = quantile (1 − level) / 2 and `*_ci_high`
= quantile (1 + level) / 2 (DuckDB's `quantile_cont`: linear interpolation, numpy's default).
Its cost is (per-row groups) × replicates, independent of the tokens per row, so a
million-token store (≈ 8,000 rows of 128) stays fast. Resample draws are resampled the same way
(weights keyed by draw instead of row) where a query pools several.

A weight is a pure function of (seed, what, replicate, key): no DuckDB random(), whose stream
depends on threads, so the same seed gives the same intervals on any machine, and a test rebuilds
them in numpy (tests/queries/test_bootstrap.py). The uniform is a 32-bit integer hash (two rounds of
x ← ((x >> 16) xor x) · 0x45d9f3b mod 2³², then (x >> 16) xor x) of the key mixed with the seed,
the replicate and the kind; the weight is the Poisson(1) inverse CDF at it. Every step
stays below 2⁶³, so DuckDB's BIGINT arithmetic never overflows.
"""

from __future__ import annotations

import math

import numpy as np

from selfrepair.errors import QueryError

MOD = 2**32
MIX = 0x45D9F3B  # the multiplier of the integer hash (well-mixed 32-bit avalanche)
PRIMES = (1_000_003, 1_000_033, 999_983)  # combine seed, kind, replicate and key before hashing
KINDS = ("row", "draw")  # what a weight resamples: a row of tokens, or a resample draw
MAX_BOOT = 10_000
# Poisson(1) CDF at 0, 1, 2, … until the tail is below one 32-bit uniform step: the weight is how many
# of these a uniform u reaches (P(w = k) = e^-1 / k!).
POISSON_CDF = tuple(np.cumsum([math.exp(-1) / math.factorial(k) for k in range(16)]).tolist())


def _sql_hash(column: str) -> str:
    return f"(xor({column} >> 16, {column}) * {MIX}) % {MOD}"


BOOT_ROWS_SQL = """
CREATE MACRO boot_rows() AS TABLE
SELECT DISTINCT model, row FROM tokens
"""

BOOT_WEIGHTS_SQL = f"""
CREATE MACRO boot_weights(seed, n_boot) AS TABLE
WITH keys AS (
    SELECT model, 'row' AS kind, row AS key FROM boot_rows()
    UNION ALL
    SELECT DISTINCT model, 'draw' AS kind, sample AS key FROM inventory WHERE ablation = 'resample'
), k0 AS (
    SELECT model, kind, key, r.range AS b,
           ((((seed::BIGINT % {MOD}) * {PRIMES[0]} + CASE kind WHEN 'row' THEN 0 ELSE 1 END) % {MOD} * {PRIMES[1]}
             + r.range) % {MOD} * {PRIMES[2]} + key) % {MOD} AS x
    FROM keys, range(n_boot::BIGINT) r
), m1 AS (
    SELECT model, kind, key, b, {_sql_hash("x")} AS x FROM k0
), m2 AS (
    SELECT model, kind, key, b, {_sql_hash("x")} AS x FROM m1
), u AS (
    SELECT model, kind, key, b, xor(x >> 16, x) / {float(MOD)!r} AS u FROM m2
)
SELECT model, kind, key, b, ({' + '.join(f"(u >= {c!r})::INTEGER" for c in POISSON_CDF)}) AS w
FROM u
"""


def check_params(bound: dict) -> None:
    """Refuse a level outside (0, 1), a negative or non-integer seed, or n_boot outside [1, MAX_BOOT], with one line."""
    if "level" in bound:
        level = bound["level"]
        if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
            raise QueryError(f"level = {level!r} is outside (0, 1): the confidence level of the *_ci_low and "
                             "*_ci_high columns, e.g. 0.95")
    if "seed" in bound:
        seed = bound["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise QueryError(f"seed = {seed!r}: the bootstrap's seed is an integer >= 0")
    if "n_boot" in bound:
        n = bound["n_boot"]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_BOOT:
            raise QueryError(f"n_boot = {n!r}: bootstrap replicates must be an integer in [1, {MAX_BOOT}]")

# Every row's weights of one replicate as one list, in row order (`boot_rows()`'s rows): a query turns
# each group's per-row sums into a list over the same rows (0 where the group has no token) and takes
# dot products, G × B × rows multiply-adds inside DuckDB's list kernels instead of a join that
# materialises G × B × rows tuples (five times faster on a million-token store).
BOOT_ROW_WEIGHTS_SQL = """
CREATE MACRO boot_row_weights(seed, n_boot) AS TABLE
SELECT model, b, list(w::DOUBLE ORDER BY key) AS w
FROM boot_weights(seed, n_boot)
WHERE kind = 'row'
GROUP BY model, b
"""

# The confidence intervals of a query's means, from its facts in long form (one value per token and
# quantity): `facts` names a table or CTE with columns model, g (the group: any value, e.g. a struct of
# layer and head), row, metric (the quantity's name) and value. Per group and quantity: the per-row sums
# and counts over every row of the model (0 where the group has no token), each replicate's mean
# (row weights · sums / row weights · counts), and the percentiles at `level`. A query pivots the
# (model, g, metric, ci_low, ci_high) rows into its `<metric>_ci_low`/`_ci_high` columns.
BOOT_CI_SQL = """
CREATE MACRO boot_ci(facts, seed, n_boot, level) AS TABLE
WITH per_row AS (
    SELECT model, g, metric, row, count(*) AS n, sum(value) AS s
    FROM query_table(facts)
    GROUP BY model, g, metric, row
), dense AS (
    SELECT gm.model, gm.g, gm.metric,
           list(coalesce(r.n, 0)::DOUBLE ORDER BY k.row) AS n,
           list(coalesce(r.s, 0)::DOUBLE ORDER BY k.row) AS s
    FROM (SELECT DISTINCT model, g, metric FROM per_row) gm
    JOIN boot_rows() k USING (model)
    LEFT JOIN per_row r ON r.model = gm.model AND r.g = gm.g AND r.metric = gm.metric AND r.row = k.row
    GROUP BY gm.model, gm.g, gm.metric
), boot AS (
    SELECT d.model, d.g, d.metric, list_dot_product(w.w, d.s) / nullif(list_dot_product(w.w, d.n), 0) AS v
    FROM dense d
    JOIN boot_row_weights(seed, n_boot) w USING (model)
)
SELECT model, g, metric, quantile_cont(v, (1 - level) / 2) AS ci_low, quantile_cont(v, (1 + level) / 2) AS ci_high
FROM boot
GROUP BY model, g, metric
"""

MACROS = (BOOT_ROWS_SQL, BOOT_WEIGHTS_SQL, BOOT_ROW_WEIGHTS_SQL, BOOT_CI_SQL)  # in dependency order
