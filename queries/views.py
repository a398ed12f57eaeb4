"""DuckDB views and table macros over a store root (DESIGN.md, "Store" and "Definitions").

Every table view is the union over models of the committed Parquet files listed by each
model's manifest, with a `model` column first. Column lists come from `store/schema.py`.
View DDL cannot take bound parameters, so file paths and model names enter it as SQL
string literals through `sql_literal`, the one place that quotes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from selfrepair.errors import SchemaMismatch
from selfrepair.queries import bootstrap  # the bootstrap weights macros (queries/bootstrap.py)
from selfrepair.store import top_tokens
from selfrepair.store.inventory import INVENTORY_COLUMNS, Inventory
from selfrepair.store.bounds import DEFAULT_BATCH_SIZE
from selfrepair.store.labels import Unit
from selfrepair.store.manifest import Manifest
from selfrepair.store.plan import unit_order
from selfrepair.store.schema import TABLES

# Arrow type -> DuckDB type, for the empty view of a table with no committed file yet.
_DUCKDB_TYPES = {
    pa.int8(): "TINYINT",
    pa.int16(): "SMALLINT",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float32(): "FLOAT",
    pa.float64(): "DOUBLE",
    pa.string(): "VARCHAR",
    pa.bool_(): "BOOLEAN",
}

MODEL_COLUMNS = ("model", "name", "n_layers", "n_heads", "d_model", "d_mlp", "n_tokens", "top_p", "top_stored",
                 "top_rows_stored", "batch_size", "neurons_top_k", "neuron_ranks")


@dataclass(frozen=True)
class ModelFiles:
    """What the views need from one model folder.

    Args:
        model: the model folder's name (the `model` column).
        manifest: its parsed manifest.
        files: table name -> committed Parquet paths, from the manifest only.
        missing: table name -> schema columns some of its files lack (a store written before the
            column existed, e.g. neuron_effects.rank); the view fills them in (`LEGACY_FILL`) or gives NULL.
        lacking: table name -> file -> the columns that file lacks (only files lacking some).
    """

    model: str
    manifest: Manifest
    files: dict[str, list[Path]]
    missing: dict[str, set[str]] = field(default_factory=dict)
    lacking: dict[str, dict[Path, frozenset[str]]] = field(default_factory=dict)

    def layouts(self, table: str) -> list[tuple[frozenset[str], list[Path]]]:
        """The table's files grouped by the columns they lack (empty set: the schema's layout)."""
        out: dict[frozenset[str], list[Path]] = {}
        lacking = self.lacking.get(table, {})
        for p in self.files.get(table) or []:
            out.setdefault(lacking.get(p, frozenset()), []).append(p)
        return sorted(out.items(), key=lambda kv: sorted(kv[0]))


def sql_literal(value: str) -> str:
    """A string as a single-quoted SQL literal (quotes doubled)."""
    return "'" + str(value).replace("'", "''") + "'"


def duckdb_type(arrow_type: pa.DataType) -> str:
    try:
        return _DUCKDB_TYPES[arrow_type]
    except KeyError:
        raise SchemaMismatch(f"no DuckDB type for Arrow type {arrow_type}") from None


# A head's label; rows of a unit that is not one head (head -1) have none.
HEAD_LABEL = "CASE WHEN head >= 0 THEN 'L' || layer || 'H' || head END AS head_label"
SRC_LABEL = ("CASE WHEN src_kind = 'mlp' THEN 'MLP' || src_layer "
             "ELSE 'L' || src_layer || 'H' || src_head END AS src_label")

# Files written before units (store/schema.py LEGACY_COLUMNS): every row one head, unconditioned,
# its clean DE (de_base) the head's `head_effects` row. A missing column not named here reads as NULL.
LEGACY_FILL = {
    "condition": "CAST('' AS VARCHAR)",
    "unit": "'L' || layer || 'H' || head",
    "unit_kind": "CAST('head' AS VARCHAR)",
    "de_base": "de_base",  # joined from head_effects below
}


def view_columns(table: str) -> list[str]:
    """A table view's columns after `model`: the schema's, with `head_label` (`L26H6`) after
    `head` and `src_label` (`L27H1` or `MLP27`) after `src_head` where the table has them."""
    names = TABLES[table].column_names
    out = []
    for name in names:
        out.append(name)
        if name == "head" and "layer" in names:
            out.append("head_label")
        if name == "src_head":
            out.append("src_label")
    return out


def _derived_column(name: str) -> str | None:
    return {"head_label": HEAD_LABEL, "src_label": SRC_LABEL}.get(name)


def _file_list(paths: list[Path]) -> str:
    return "[" + ", ".join(sql_literal(str(p)) for p in paths) + "]"


def table_view_sql(table: str, models: list[ModelFiles], name: str | None = None, fill_de_base: bool = True) -> str:
    """`CREATE VIEW <table>`: model column plus the schema's columns, union over models and file layouts.

    Args:
        name: the view's name (default: the table's).
        fill_de_base: fill a file written before units' de_base from head_effects (a join over every
            head and token); False: NULL, for the macros that know the head's clean DE already.
    """
    spec = TABLES[table]
    cols = ", ".join(_derived_column(c) or c for c in view_columns(table))
    types = dict(spec.columns)
    parts = []
    for m in models:
        for missing, paths in m.layouts(table):
            own = ", ".join(
                _derived_column(c) or (f"CAST({LEGACY_FILL[c]} AS {duckdb_type(types[c])}) AS {c}"
                                       if c in LEGACY_FILL else f"CAST(NULL AS {duckdb_type(types[c])}) AS {c}")
                if c in missing else _derived_column(c) or c
                for c in view_columns(table))
            source = f"read_parquet({_file_list(paths)})"
            heads = m.files.get("head_effects") or []
            if "de_base" in missing and heads and fill_de_base:
                source = (f"(SELECT a.*, h.de AS de_base FROM {source} a LEFT JOIN "
                          f"read_parquet({_file_list(heads)}) h USING (layer, head, token_index))")
            elif "de_base" in missing:
                source = f"(SELECT *, CAST(NULL AS FLOAT) AS de_base FROM {source})"
            parts.append(f"SELECT {sql_literal(m.model)} AS model, {own} FROM {source}")
    if not parts:
        typed = ", ".join(f"CAST(NULL AS {duckdb_type(t)}) AS {n}" for n, t in spec.columns)
        parts.append(f"SELECT model, {cols} FROM (SELECT CAST(NULL AS VARCHAR) AS model, {typed} WHERE false)")
    return f"CREATE VIEW {name or table} AS\n" + "\nUNION ALL\n".join(parts)


def model_units(manifest: Manifest) -> list[Unit]:
    """Every unit a model's shards name, as ablated unit or as condition, in `unit_order`."""
    n_layers, n_heads = manifest.model.n_layers, manifest.model.n_heads
    out: dict[str, Unit] = {}
    for e in manifest.shards.values():
        if e.phase == "clean":
            continue
        out.update({u.label: u for u in e.unit_list(n_layers, n_heads)})
        cond = e.condition_unit(n_layers, n_heads)
        if cond is not None:
            out[cond.label] = cond
    return sorted(out.values(), key=unit_order)


STORED_UNITS_COLUMNS = ("model", "ablation", "sample", "condition", "unit", "unit_kind", "layer", "head", "batches")


def stored_units_view_sql(models: list[ModelFiles]) -> str:
    """`CREATE VIEW stored_units`: per model, draw, condition and unit with a stored ablation shard, the
    unit's kind, layer and head and how many batches hold it (from the manifests alone)."""
    rows = []
    for m in models:
        n_layers, n_heads = m.manifest.model.n_layers, m.manifest.model.n_heads
        seen: dict[tuple, tuple[Unit, set]] = {}
        samples = m.manifest.resample.samples
        for e in m.manifest.shards.values():
            if e.phase != "ablation":
                continue
            # A shard holding several draws (written by hand, no `ablation`): the recorded configuration's.
            draws = [e.draw] if e.ablation is not None else [
                (k, s) for k in m.manifest.ablation_kinds for s in (range(samples) if k == "resample" else [0])]
            cond = e.condition_label(n_layers, n_heads)
            for kind, sample in draws:
                for u in e.unit_list(n_layers, n_heads):
                    seen.setdefault((kind, sample, cond, u.label), (u, set()))[1].add(e.rows)
        order = lambda kv: (kv[0][:3], unit_order(kv[1][0]))  # noqa: E731 - draw, condition, then unit
        for (kind, sample, cond, _), (u, batches) in sorted(seen.items(), key=order):
            rows.append((m.model, kind, sample, cond, u.label, u.kind, u.layer, u.head, len(batches)))
    cols = ", ".join(STORED_UNITS_COLUMNS)
    if not rows:
        return (f"CREATE VIEW stored_units AS SELECT * FROM (VALUES ('', '', 0, '', '', '', 0, 0, 0)) v({cols}) "
                "WHERE false")
    values = ",\n".join("(" + ", ".join(sql_literal(v) if isinstance(v, str) else str(int(v)) for v in r) + ")"
                        for r in rows)
    return f"CREATE VIEW stored_units({cols}) AS VALUES\n{values}"


def unit_members_view_sql(models: list[ModelFiles]) -> str:
    """`CREATE VIEW unit_members`: per model and stored unit (or condition), each component it replaces
    (a head, or an MLP with head -1): what a unit's clean DE sums."""
    rows = []
    for m in models:
        n_heads = m.manifest.model.n_heads
        for u in model_units(m.manifest):
            rows += [(m.model, u.label, u.kind, "head", la, h) for la, h in u.heads(n_heads)]
            rows += [(m.model, u.label, u.kind, "mlp", la, -1) for la in u.mlps()]
    cols = "model, unit, unit_kind, component, layer, head"
    if not rows:
        return (f"CREATE VIEW unit_members AS SELECT * FROM (VALUES ('', '', '', '', 0, 0)) v({cols}) WHERE false")
    values = ",\n".join(f"({sql_literal(a)}, {sql_literal(b)}, {sql_literal(c)}, {sql_literal(d)}, {la}, {h})"
                        for a, b, c, d, la, h in rows)
    return f"CREATE VIEW unit_members({cols}) AS VALUES\n{values}"


def models_view_sql(models: list[ModelFiles]) -> str:
    """`CREATE VIEW models`: one row per model with the manifest facts queries need."""
    rows = []
    for m in models:
        info = m.manifest.model
        top_p = m.manifest.config.top_p
        # The stored top-token set serves top_tokens(p) only while it matches this store.
        stored = m.manifest.derived.get("head_top_tokens")
        top_stored = top_tokens.is_current(stored, m.manifest.n_tokens, top_p)
        # Every ablation shard carries its `ablation_top` slice (stores written before it existed do not).
        top_rows = all(e.holds("ablation_top") for e in m.manifest.shards.values() if e.phase == "ablation")
        batch_size = m.manifest.batch_size or DEFAULT_BATCH_SIZE
        # Neuron ranks by signed change in DE (and neuron_totals) exist from the schema that added `rank`.
        ranks = "rank" not in m.missing.get("neuron_effects", set())
        rows.append(
            "("
            + ", ".join(
                [
                    sql_literal(m.model),
                    sql_literal(info.name or m.model),
                    str(info.n_layers),
                    str(info.n_heads),
                    str(info.d_model or 0),
                    str(info.d_mlp or 0),
                    str(m.manifest.n_tokens),
                    repr(float(top_p)),
                    "true" if top_stored else "false",
                    "true" if top_rows else "false",
                    str(int(batch_size)),
                    str(m.manifest.config.neurons_top_k),
                    "true" if ranks else "false",
                ]
            )
            + ")"
        )
    cols = ", ".join(MODEL_COLUMNS)
    return f"CREATE VIEW models({cols}) AS VALUES\n" + ",\n".join(rows)


# Double arithmetic throughout: the columns are float32 and the differences are small.
# One column list serves the full view and the top-token macro, so they cannot drift.
_SELF_REPAIR_COLUMNS = """
       de_clean, de_ablated,
       de_ablated - de_clean AS d_de,
       d_logit,
       d_logit - (de_ablated - de_clean) AS sr,
       sr_heads, sr_mlps,
       d_logit - (de_ablated - de_clean) - sr_heads - sr_mlps AS sr_ln,
       ln_ratio,
       -- DESIGN.md closed form: (s/s_abl - 1) * (logit_abl - b_U) * s_abl / s
       (ln_ratio - 1) * (logit + d_logit - unembed_bias) / ln_ratio AS sr_ln_closed,
       -- output metrics against the baseline's distribution (NULL where the store holds none)
       d_loss, kl, d_entropy, top1_changed"""

# A conditioned row's baseline is the condition-ablated run (DESIGN.md, "Conditions"): its logit
# and final-norm scale come from condition_tokens, its unit's DE from de_base; an unconditioned
# row's from tokens and de_base (the unit's clean DE; a head's is its head_effects row).
_BASE_COLUMNS = """
           a.de_base::DOUBLE AS de_clean,
           a.de::DOUBLE AS de_ablated,
           a.d_logit::DOUBLE AS d_logit,
           a.d_de_heads::DOUBLE AS sr_heads,
           a.d_de_mlps::DOUBLE AS sr_mlps,
           (CASE WHEN a.condition = '' THEN t.ln_scale ELSE c.ln_scale END)::DOUBLE / a.ln_scale::DOUBLE AS ln_ratio,
           (CASE WHEN a.condition = '' THEN t.logit ELSE c.logit END)::DOUBLE AS logit,
           t.unembed_bias::DOUBLE AS unembed_bias,
           a.d_loss::DOUBLE AS d_loss,
           a.kl::DOUBLE AS kl,
           a.d_entropy::DOUBLE AS d_entropy,
           a.top1_changed"""

_BASE_JOINS = """
    JOIN tokens t USING (model, token_index)
    LEFT JOIN condition_tokens c
        ON c.model = a.model AND c.ablation = a.ablation AND c.sample = a.sample AND c.condition = a.condition
       AND c.token_index = a.token_index"""

_UNIT_KEY = "model, ablation, sample, condition, unit, unit_kind, layer, head"

SELF_REPAIR_SQL = f"""
CREATE VIEW self_repair AS
WITH base AS (
    SELECT a.model, a.ablation, a.sample, a.condition, a.unit, a.unit_kind, a.layer, a.head, a.token_index,
{_BASE_COLUMNS}
    FROM ablation_effects a{_BASE_JOINS}
)
SELECT {_UNIT_KEY}, {HEAD_LABEL}, token_index,{_SELF_REPAIR_COLUMNS}
FROM base
"""

# Top p% of a head: floor(p * N) tokens by signed clean DE, ties to the lower token_index
# (as ingest). At the ingest's own p the set written by ingest (`head_top_tokens`) is
# read; any other p computes it with a bounded top-N aggregate (max_by with n) rather
# than a window sort. max_by's key is (de, -token_index), so equal DEs prefer lower
# indices. Each branch's filter on `models` is false for the other's models, and DuckDB
# then skips that branch's scan.
TOP_TOKENS_SQL = f"""
CREATE MACRO top_tokens(p) AS TABLE
SELECT model, layer, head, {HEAD_LABEL}, token_index, de FROM (
SELECT t.model, t.layer, t.head, t.token_index, t.de
FROM head_top_tokens t JOIN models m USING (model)
WHERE m.top_stored AND m.top_p = p
UNION ALL
SELECT model, layer, head, token_index, de
FROM (
    SELECT h.model, h.layer, h.head,
           unnest(max_by({{'token_index': h.token_index, 'de': h.de}},
                         {{'de': h.de, 'neg_index': -h.token_index}},
                         CAST(floor(p * m.n_tokens) AS BIGINT)), recursive := true)
    FROM head_effects h JOIN models m USING (model)
    WHERE floor(p * m.n_tokens) >= 1 AND NOT (m.top_stored AND m.top_p = p)
    GROUP BY h.model, h.layer, h.head, m.n_tokens
))
"""

# Top p% of every stored unit (and condition) by its clean DE, the sum of its components'
# (unit_members), by the same rule; a head unit's set is top_tokens(p)'s. A conditioned unit
# reads its own label's set: the unit alone's (store/top_tokens.py `unit_top_sets`, the ingest's).
UNIT_TOP_TOKENS_SQL = """
CREATE MACRO unit_top_tokens(p) AS TABLE
SELECT u.model, u.unit, u.unit_kind, t.token_index, t.de::DOUBLE AS de
FROM unit_members u JOIN top_tokens(p) t USING (model, layer, head)
WHERE u.unit_kind = 'head'
UNION ALL
SELECT model, unit, unit_kind, token_index, de
FROM (
    SELECT d.model, d.unit, d.unit_kind,
           unnest(max_by({'token_index': d.token_index, 'de': d.de},
                         {'de': d.de, 'neg_index': -d.token_index},
                         CAST(floor(p * m.n_tokens) AS BIGINT)), recursive := true)
    FROM (
        SELECT u.model, u.unit, u.unit_kind, c.token_index, sum(c.de::DOUBLE) AS de
        FROM unit_members u
        JOIN (SELECT model, 'head' AS component, layer, head, token_index, de FROM head_effects
              UNION ALL
              SELECT model, 'mlp' AS component, layer, -1 AS head, token_index, de FROM mlp_effects) c
          USING (model, component, layer, head)
        WHERE u.unit_kind <> 'head'
        GROUP BY ALL
    ) d JOIN models m USING (model)
    WHERE floor(p * m.n_tokens) >= 1
    GROUP BY d.model, d.unit, d.unit_kind, m.n_tokens
)
"""

# Start from the small top set and join outwards, rather than filtering the full view.
# At the ingest's own p the ablation rows come from `ablation_top` (2% of the rows), else
# from `ablation_top`'s source, `ablation_effects`; as in top_tokens(p), each branch's filter
# on `models` is false for the other's models and DuckDB then skips that branch's scan.
# A head unit's tokens are its head's top_tokens(p), any other unit's its unit_top_tokens(p).
# The ablation tables with a legacy file's de_base left NULL (no join over head_effects): what
# self_repair_top reads, taking that head's clean DE from its top set instead.
UNFILLED = "unfilled_"
_ABL_COLUMNS = "a.model, a.ablation, a.sample, a.condition, a.unit, a.unit_kind, a.layer, a.head, a.token_index, " \
               "a.de, a.de_base, a.d_logit, a.d_de_heads, a.d_de_mlps, a.ln_scale, " \
               "a.d_loss, a.kl, a.d_entropy, a.top1_changed"
SELF_REPAIR_TOP_SQL = f"""
CREATE MACRO self_repair_top(p) AS TABLE
WITH abl AS (
    SELECT {_ABL_COLUMNS}
    FROM {UNFILLED}ablation_top a JOIN models m USING (model)
    WHERE m.top_stored AND m.top_rows_stored AND m.top_p = p
    UNION ALL
    SELECT {_ABL_COLUMNS}
    FROM {UNFILLED}ablation_effects a JOIN models m USING (model)
    WHERE NOT (m.top_stored AND m.top_rows_stored AND m.top_p = p)
), top AS (
    SELECT model, layer, head, token_index, de FROM top_tokens(p)
), unit_top AS (
    SELECT model, unit, token_index FROM unit_top_tokens(p) WHERE unit_kind <> 'head'
), picked AS (
    -- a file written before units has no de_base: its head's clean DE is the top set's
    SELECT a.* REPLACE (coalesce(a.de_base, top.de) AS de_base)
    FROM abl a JOIN top USING (model, layer, head, token_index) WHERE a.unit_kind = 'head'
    UNION ALL
    SELECT a.* FROM abl a JOIN unit_top USING (model, unit, token_index) WHERE a.unit_kind <> 'head'
), base AS (
    SELECT a.model, a.ablation, a.sample, a.condition, a.unit, a.unit_kind, a.layer, a.head, a.token_index,
{_BASE_COLUMNS}
    FROM picked a{_BASE_JOINS}
)
SELECT {_UNIT_KEY}, {HEAD_LABEL}, token_index,{_SELF_REPAIR_COLUMNS}
FROM base
"""

# The authors' second token set (Rushing & Nanda's code): a head's floor(top_p * N) tokens with
# the largest signed sr_mlps = d_de_mlps under one ablation draw, ties to the lower token_index,
# at the ingest's own top_p (the only p with neuron rows); head units, unconditioned. A selected token that neuron_totals
# lacks (the ingest's --sr-mlps-neurons did not name the head) refuses the query with one line.
# One layer (lyr -1: the penultimate, n_layers - 2) and one head (hd -1: all): the filter must sit
# inside, below the refusing projection, or other heads' tokens would refuse too.
SR_MLPS_TOP_SQL = f"""
CREATE MACRO sr_mlps_top(abl, smp, lyr, hd) AS TABLE
SELECT model, layer, head, head_label, sr_mlps,
       -- every query joins on token_index, so a selected token without neuron rows always refuses
       CASE WHEN has_neurons THEN token_index ELSE error(
           head_label || ': its top tokens by sr_mlps have no neuron rows; ingest them with '
           || '`selfrepair ingest --sr-mlps-neurons ' || head_label || '` (or all, or penultimate)') END
           AS token_index
FROM (
    SELECT a.model, a.layer, a.head, {HEAD_LABEL}, a.token_index, a.d_de_mlps::DOUBLE AS sr_mlps,
           EXISTS (SELECT 1 FROM neuron_totals n
                   WHERE n.model = a.model AND n.ablation = abl AND n.sample = smp AND n.condition = ''
                     AND n.unit = a.unit AND n.token_index = a.token_index) AS has_neurons
    FROM ablation_effects a JOIN models m USING (model)
    WHERE a.ablation = abl AND a.sample = smp AND a.condition = '' AND a.unit_kind = 'head'
      AND a.layer = CASE WHEN lyr < 0 THEN m.n_layers - 2 ELSE lyr END AND (hd < 0 OR a.head = hd)
    QUALIFY row_number() OVER (PARTITION BY a.model, a.layer, a.head
                               ORDER BY a.d_de_mlps DESC, a.token_index) <= floor(m.top_p * m.n_tokens)
)
"""

# The authors' all-token per-head means (their scatter of DE against logit change), head units
# unconditioned: over the tokens with |clean DE| > 0, the mean of each batch (batch_size rows), then the mean of those.
PAPER_HEAD_MEANS_SQL = """
CREATE MACRO paper_head_means(abl, smp) AS TABLE
WITH batches AS (
    SELECT s.model, s.layer, s.head, t.row // m.batch_size AS batch,
           avg(s.de_clean) AS de_clean, avg(s.d_logit) AS d_logit, count(*) AS n_tokens
    FROM self_repair s
    JOIN tokens t USING (model, token_index)
    JOIN models m USING (model)
    WHERE s.ablation = abl AND s.sample = smp AND abs(s.de_clean) > 0 AND s.condition = '' AND s.unit_kind = 'head'
    GROUP BY ALL
)
SELECT model, layer, head, count(*) AS n_batches, sum(n_tokens) AS n_tokens,
       avg(de_clean) AS de_clean, avg(d_logit) AS d_logit
FROM batches
GROUP BY ALL
"""

# Each prediction in its text: `before` is the row's text up to and including the input
# token (n tokens), `token` the predicted next token, `after` the n tokens that follow it.
TOKEN_CONTEXT_SQL = """
CREATE MACRO token_context(n) AS TABLE
SELECT model, token_index, row, pos,
       string_agg(token_str, '') OVER (PARTITION BY model, row ORDER BY pos
                                       ROWS BETWEEN n - 1 PRECEDING AND CURRENT ROW) AS before,
       next_token_str AS token,
       coalesce(string_agg(next_token_str, '') OVER (PARTITION BY model, row ORDER BY pos
                                                     ROWS BETWEEN 1 FOLLOWING AND n FOLLOWING), '') AS after
FROM tokens
"""


# Measured mechanisms (DESIGN.md, "Beyond single heads"): each counterfactual re-run as readers see it,
# d_de the unit's change in DE (de − de_base), head NULL for a unit that is not one head.
COUNTERFACTUAL_EFFECTS_COLUMNS = ("model", "ablation", "sample", "unit", "layer", "head", "token_index", "condition",
                                  "counterfactual", "d_logit", "ln_scale", "d_de", "d_de_heads", "d_de_mlps")
COUNTERFACTUAL_EFFECTS_SQL = """
CREATE VIEW counterfactual_effects AS
SELECT model, ablation, sample, unit, layer, CASE WHEN head >= 0 THEN head END AS head, token_index, condition,
       counterfactual, d_logit::DOUBLE AS d_logit, ln_scale::DOUBLE AS ln_scale,
       de::DOUBLE - de_base::DOUBLE AS d_de, d_de_heads::DOUBLE AS d_de_heads, d_de_mlps::DOUBLE AS d_de_mlps
FROM counterfactual_runs
"""

# Each repair channel per unit and token that has a counterfactual (its top-p% tokens):
#   ln_final         the final norm, closed form (self_repair's sr_ln_closed, = sr_ln);
#   ln_intermediate  d_logit − d_logit[frozen-norms] less the final norm's part (frozen-norms freezes both);
#   attention        d_logit − d_logit[frozen-attention]: attention patterns moving;
#   rest             sr less those three (NULL unless both counterfactuals are stored).
# A channel whose counterfactual was not ingested is NULL. A token whose re-run under a stored
# counterfactual overflowed float32 (never stored: query counterfactual_coverage) has no row, so every
# channel is averaged over the same tokens.
REPAIR_CHANNELS_SQL = """
CREATE VIEW repair_channels AS
WITH cf AS (
    SELECT model, ablation, sample, condition, unit, token_index,
           max(d_logit) FILTER (WHERE counterfactual = 'frozen-norms') AS d_logit_frozen_norms,
           max(d_logit) FILTER (WHERE counterfactual = 'frozen-attention') AS d_logit_frozen_attention
    FROM counterfactual_effects
    GROUP BY ALL
), stored AS (
    SELECT model, bool_or(counterfactual = 'frozen-norms') AS norms,
           bool_or(counterfactual = 'frozen-attention') AS attention
    FROM counterfactual_effects
    GROUP BY model
), complete AS (
    SELECT cf.* FROM cf JOIN stored USING (model)
    WHERE (NOT stored.norms OR d_logit_frozen_norms IS NOT NULL)
      AND (NOT stored.attention OR d_logit_frozen_attention IS NOT NULL)
), joined AS (
    SELECT s.model, s.ablation, s.sample, s.condition, s.unit, s.unit_kind, s.layer, s.head, s.head_label,
           s.token_index, s.de_clean, s.d_de, s.d_logit, s.sr, s.sr_heads, s.sr_mlps, s.sr_ln,
           s.sr_ln_closed AS ln_final,
           s.d_logit - cf.d_logit_frozen_norms - s.sr_ln_closed AS ln_intermediate,
           s.d_logit - cf.d_logit_frozen_attention AS attention,
           cf.d_logit_frozen_norms, cf.d_logit_frozen_attention
    FROM complete cf JOIN self_repair s USING (model, ablation, sample, condition, unit, token_index)
)
SELECT *, sr - ln_final - ln_intermediate - attention AS rest
FROM joined
"""


def inventory_view_sql(models: list[ModelFiles]) -> str:
    """`CREATE VIEW inventory`: one row per model and stored (ablation, draw), from the manifests."""
    rows = [r for m in models for r in Inventory.of(m.model, m.manifest).rows()]
    cols = ", ".join(INVENTORY_COLUMNS)
    if not rows:
        return (f"CREATE VIEW inventory AS SELECT * FROM (VALUES ('', '', 0, '', 0, 0, 0, 0, 0, 0.0, 0, 0, '', '', '')) "
                f"v({cols}) WHERE false")

    def lit(v) -> str:
        return sql_literal(v) if isinstance(v, str) else f"CAST({v!r} AS DOUBLE)" if isinstance(v, float) else repr(v)

    values = ",\n".join("(" + ", ".join(lit(r[c]) for c in INVENTORY_COLUMNS) + ")" for r in rows)
    return f"CREATE VIEW inventory({cols}) AS VALUES\n{values}"


DERIVED_VIEWS = ("models", "inventory", "stored_units", "unit_members", "self_repair", "counterfactual_effects",
                 "repair_channels")


def view_statements(models: list[ModelFiles]) -> list[str]:
    """Every DDL statement, in dependency order."""
    out = [table_view_sql(t, models) for t in TABLES]
    out += [table_view_sql(t, models, UNFILLED + t, fill_de_base=False) for t in ("ablation_effects", "ablation_top")]
    out += [models_view_sql(models), inventory_view_sql(models), stored_units_view_sql(models),
            unit_members_view_sql(models), SELF_REPAIR_SQL,
            TOP_TOKENS_SQL, UNIT_TOP_TOKENS_SQL, SELF_REPAIR_TOP_SQL, SR_MLPS_TOP_SQL, PAPER_HEAD_MEANS_SQL,
            TOKEN_CONTEXT_SQL, COUNTERFACTUAL_EFFECTS_SQL, REPAIR_CHANNELS_SQL, *bootstrap.MACROS]
    return out


def view_names() -> list[str]:
    return list(TABLES) + list(DERIVED_VIEWS)
