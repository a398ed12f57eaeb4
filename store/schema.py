"""The single source of truth for the store's tables and arrays (DESIGN.md, "Store").

Writers, readers, views, tests and the README import these definitions; nobody
retypes a column list. Key columns use the same dimension names as the tensors
and the Zarr arrays (`layer`, `head`, `token_index`, `neuron`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

# 3: ablation tables keyed by (condition, unit), shard entries naming `units` and `condition`
# (files and entries of 2 and before are read as head units without a condition; a store they
# are extended into becomes 3, so an older selfrepair refuses it rather than misread it).
# 2: commits go to an append-only log (`commits/<generation>.jsonl`) folded into the
# manifest at checkpoints. 1: every commit rewrote the manifest (read, never written).
# 4: output metrics (d_loss, kl, d_entropy, top1_changed in the ablation tables, entropy in `tokens`,
# loss and entropy in `condition_tokens`; files of 3 and before, and of runs with `--output-metrics
# none`, lack them and read as NULL).
SCHEMA_VERSION = 4
READABLE_SCHEMA_VERSIONS = (1, 2, 3, 4)


@dataclass(frozen=True)
class Table:
    """One Parquet table of the store.

    Args:
        name: table name, also the folder under `tables/` and the SQL view name.
        key: columns that identify a row (unique within a model's store).
        columns: every column in order, keys first, with its Arrow type.
        doc: one line on what a row is.
    """

    name: str
    key: tuple[str, ...]
    columns: tuple[tuple[str, pa.DataType], ...]
    doc: str

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema([pa.field(n, t, nullable=False) for n, t in self.columns])

    @property
    def column_names(self) -> list[str]:
        return [n for n, _ in self.columns]


I32, I16, F32 = pa.int32(), pa.int16(), pa.float32()
STR = pa.string()
BOOL = pa.bool_()

# Output metrics of every ablation row (DESIGN.md, "Beyond single heads"), from the model's true output
# distribution p against the baseline's: d_loss = loss' − loss, kl = KL(p ‖ p'), d_entropy = H(p') − H(p),
# top1_changed = argmax p' ≠ argmax p (natural log, float32).
OUTPUT_METRICS = ("d_loss", "kl", "d_entropy", "top1_changed")
_METRICS = (("d_loss", F32), ("kl", F32), ("d_entropy", F32), ("top1_changed", BOOL))

TOKENS = Table(
    "tokens",
    ("token_index",),
    (
        ("token_index", I32),
        ("row", I32),
        ("pos", I16),
        ("token_id", I32),
        ("next_token_id", I32),
        ("token_str", STR),
        ("next_token_str", STR),
        ("logit", F32),
        ("ln_scale", F32),
        ("unembed_bias", F32),
        ("loss", F32),
        ("de_other", F32),
        ("entropy", F32),
    ),
    "one prediction: the token at (row, pos) predicting next_token_id, on the clean run (loss: cross-entropy of "
    "next_token_id, entropy: of the output distribution, natural log)",
)

HEAD_EFFECTS = Table(
    "head_effects",
    ("layer", "head", "token_index"),
    (("layer", I16), ("head", I16), ("token_index", I32), ("de", F32)),
    "clean direct effect of one attention head on the correct next token",
)

MLP_EFFECTS = Table(
    "mlp_effects",
    ("layer", "token_index"),
    (("layer", I16), ("token_index", I32), ("de", F32)),
    "clean direct effect of one MLP layer (output with bias) on the correct next token",
)

# Every ablation table names what was ablated (DESIGN.md, "Beyond single heads"):
# `condition` ("" for none, else the condition unit's label), `unit` (store/labels.py
# `Unit.label`) and `unit_kind` (`Unit.kind`), right after `sample`; `layer` is the unit's
# first layer and `head` its head (-1 for a unit that is not one head). A row's key holds
# (condition, unit) where it held (layer, head) before units existed.
UNIT_COLUMNS = (("condition", STR), ("unit", STR), ("unit_kind", STR), ("layer", I16), ("head", I16))
_DRAW = (("ablation", STR), ("sample", I16))
_UNIT_KEY = ("ablation", "sample", "condition", "unit")

ABLATION_EFFECTS = Table(
    "ablation_effects",
    _UNIT_KEY + ("token_index",),
    _DRAW + UNIT_COLUMNS + (
        ("token_index", I32),
        ("d_logit", F32),
        ("ln_scale", F32),
        ("de", F32),
        ("de_base", F32),
        ("d_de_heads", F32),
        ("d_de_mlps", F32),
    ) + _METRICS,
    "one unit ablated (under its condition, if any) on one token: change in logit against the baseline run "
    "(clean, or condition-ablated), ablated final-norm scale, the unit's DE after (de) and in the baseline (de_base) "
    "at the baseline's scale, the summed change in DE of the heads and MLPs outside it, and the output metrics "
    "against the baseline's distribution (d_loss, kl = KL(baseline ‖ ablated), d_entropy, top1_changed)",
)

ABLATION_TOP = Table(
    "ablation_top",
    ABLATION_EFFECTS.key,
    ABLATION_EFFECTS.columns,
    "the ablation_effects rows of each ablated unit's top-p% tokens (the ingest's top_p; a conditioned unit: "
    "its unconditioned unit's set): what per-unit questions on top tokens read",
)

RESAMPLE_SOURCES = Table(
    "resample_sources",
    ("sample", "row"),
    (("sample", I16), ("row", I32), ("source_row", I32)),
    "for each resample draw, the row whose activations replace this row's",
)

REPAIR_SOURCES = Table(
    "repair_sources",
    _UNIT_KEY + ("token_index", "src_kind", "src_layer", "src_head"),
    _DRAW + UNIT_COLUMNS + (
        ("token_index", I32),
        ("src_kind", STR),
        ("src_layer", I16),
        ("src_head", I16),
        ("d_de", F32),
    ),
    "top-p% tokens only: the change in DE of each downstream head or MLP (src_head -1) outside the unit",
)

NEURON_EFFECTS = Table(
    "neuron_effects",
    _UNIT_KEY + ("token_index", "neuron"),
    _DRAW + UNIT_COLUMNS + (
        ("token_index", I32),
        ("neuron", I32),
        ("rank", I16),
        ("de_clean", F32),
        ("de_ablated", F32),
    ),
    "detail tokens only (each unit's top-p% tokens by clean DE, and by sr_mlps for the heads "
    "`--sr-mlps-neurons` names): the final-MLP neurons whose signed change in DE ranks in the "
    "top k or the bottom k; rank is the 1-based rank of de_ablated - de_clean, largest first, "
    "among all d_mlp neurons (rank > d_mlp - k: the bottom k). Units holding the final MLP have none",
)

NEURON_TOTALS = Table(
    "neuron_totals",
    _UNIT_KEY + ("token_index",),
    _DRAW + UNIT_COLUMNS + (
        ("token_index", I32),
        ("d_de_sum", F32),
        ("d_de_abs_sum", F32),
        ("d_de_pos_sum", F32),
    ),
    "detail tokens only (as neuron_effects): over all d_mlp final-MLP neurons, the sum of the "
    "change in DE, of its absolute value and of its positive part",
)

ATTENTION_TOP = Table(
    "attention_top",
    _UNIT_KEY + ("token_index", "rank"),
    _DRAW + UNIT_COLUMNS + (
        ("token_index", I32),
        ("rank", I16),
        ("src_pos", I16),
        ("src_token_index", I32),
        ("weight", F32),
    ),
    "head units' top-p% tokens only: the k source positions the head attends to most on the clean run "
    "(rank 1 = largest weight); stored with each ablation draw's shard, the same rows in every draw",
)

CONDITION_TOKENS = Table(
    "condition_tokens",
    ("ablation", "sample", "condition", "token_index"),
    _DRAW + (("condition", STR), ("token_index", I32), ("logit", F32), ("ln_scale", F32), ("loss", F32),
             ("entropy", F32)),
    "conditioned runs only: the condition-ablated run's centred correct-token logit minus b_U (as tokens.logit), "
    "its final-norm scale, loss and entropy, the baseline of every row ablated under that condition",
)

# Measured mechanisms (DESIGN.md, "Beyond single heads"): an ablation re-run on its unit's top-p% tokens
# with every downstream norm scale (frozen-norms) or attention pattern (frozen-attention) the baseline's.
COUNTERFACTUAL_NAMES = ("frozen-norms", "frozen-attention")
_CF_KEY = _UNIT_KEY + ("counterfactual",)

COUNTERFACTUAL_RUNS = Table(
    "counterfactual_runs",
    _CF_KEY + ("token_index",),
    _DRAW + UNIT_COLUMNS + (
        ("counterfactual", STR),
        ("token_index", I32),
        ("d_logit", F32),
        ("ln_scale", F32),
        ("de", F32),
        ("de_base", F32),
        ("d_de_heads", F32),
        ("d_de_mlps", F32),
    ),
    "top-p% tokens only: one unit's ablation re-run under a counterfactual (--counterfactuals): change in logit "
    "against the baseline run, the final-norm scale it divides by (the baseline's under frozen-norms), the unit's "
    "DE after (de) and in the baseline (de_base), and the summed change in DE of the heads and MLPs outside it",
)

COUNTERFACTUAL_SOURCES = Table(
    "counterfactual_sources",
    _CF_KEY + ("token_index", "src_kind", "src_layer", "src_head"),
    _DRAW + UNIT_COLUMNS + (
        ("counterfactual", STR),
        ("token_index", I32),
        ("src_kind", STR),
        ("src_layer", I16),
        ("src_head", I16),
        ("d_de", F32),
    ),
    "as repair_sources, for each counterfactual re-run: the change in DE of each downstream head or MLP "
    "(src_head -1) outside the unit",
)

HEAD_TOP_TOKENS = Table(
    "head_top_tokens",
    ("layer", "head", "token_index"),
    (("layer", I16), ("head", I16), ("token_index", I32), ("de", F32)),
    "derived: each head's top floor(top_p · N) tokens at the ingest's top_p, rewritten when tokens are added",
)

VOCAB = Table(
    "vocab",
    ("token_id",),
    (("token_id", I32), ("token_str", STR)),
    "derived: every token id of the unembedding and its decoded string",
)

TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        TOKENS,
        HEAD_EFFECTS,
        MLP_EFFECTS,
        ABLATION_EFFECTS,
        ABLATION_TOP,
        RESAMPLE_SOURCES,
        REPAIR_SOURCES,
        NEURON_EFFECTS,
        NEURON_TOTALS,
        ATTENTION_TOP,
        CONDITION_TOKENS,
        COUNTERFACTUAL_RUNS,
        COUNTERFACTUAL_SOURCES,
        HEAD_TOP_TOKENS,
        VOCAB,
    )
}

# The columns that units added (UNIT_COLUMNS but layer and head, and de_base): files written
# before hold every other column of their table in the same order, and key on (layer, head).
ADDED_BY_UNITS = ("condition", "unit", "unit_kind", "de_base")
UNIT_TABLES = ("ablation_effects", "ablation_top", "repair_sources", "neuron_effects", "neuron_totals",
               "attention_top")


# The output-metric columns of each table: absent from files of schema 3 and before, and from a run
# with `--output-metrics none` (readers see NULL).
METRIC_COLUMNS: dict[str, tuple[str, ...]] = {
    "tokens": ("entropy",),
    "ablation_effects": OUTPUT_METRICS,
    "ablation_top": OUTPUT_METRICS,
    "condition_tokens": ("loss", "entropy"),
}


def without_metrics(name: str) -> tuple[str, ...]:
    """A table's columns in a file without output metrics."""
    return tuple(c for c in TABLES[name].column_names if c not in METRIC_COLUMNS.get(name, ()))


def _before_units(name: str, drop: tuple[str, ...] = ()) -> tuple[str, ...]:
    return tuple(c for c in without_metrics(name) if c not in ADDED_BY_UNITS + drop)


# A table's columns as stores written before a change of its schema hold them: such files are
# still read, verified and compacted, never written. Before units: no condition, unit,
# unit_kind or de_base (every row one head, unconditioned; the views fill them in).
# neuron_effects before `rank` too (neurons then ranked by abs(change in DE), no neuron_totals).
LEGACY_COLUMNS: dict[str, tuple[tuple[str, ...], ...]] = {
    name: (_before_units(name),) for name in UNIT_TABLES
}
LEGACY_COLUMNS["neuron_effects"] += (_before_units("neuron_effects", ("rank",)),)
for _name in METRIC_COLUMNS:  # before output metrics, or written with --output-metrics none
    LEGACY_COLUMNS[_name] = LEGACY_COLUMNS.get(_name, ()) + (without_metrics(_name),)


def file_key(table: Table, names) -> tuple[str, ...]:
    """The key of a file of `table` with columns `names`: the schema's, or, for a file written
    before units (no `unit` column), the same with (layer, head) in place of (condition, unit)."""
    if "unit" in names or "unit" not in table.key:
        return table.key
    out: list[str] = []
    for k in table.key:
        out += ["layer", "head"] if k == "unit" else [] if k == "condition" else [k]
    return tuple(out)


# Tables rebuilt whole from the others (one file each, `derived` in the manifest), never sharded.
DERIVED_TABLES = ("head_top_tokens", "vocab")
# A shard's phase: the clean pass, an ablation draw, or extra neuron detail (`--sr-mlps-neurons`).
SHARD_PHASES = ("clean", "ablation", "neurons")

ABLATION_KINDS = ("resample", "mean", "zero")
SRC_KINDS = ("head", "mlp")  # repair_sources.src_kind, in that order


@dataclass(frozen=True)
class ArraySpec:
    """One Zarr array of the clean run, token-major and aligned with `token_index`.

    Args:
        name: array path inside `activations.zarr`.
        dims: `dimension_names`, the first always `token_index`.
        doc: what it holds.
    """

    name: str
    dims: tuple[str, ...]
    doc: str


ARRAYS: dict[str, ArraySpec] = {
    a.name: a
    for a in (
        ArraySpec("resid_pre", ("token_index", "layer", "d_model"), "residual entering each block"),
        ArraySpec("resid_final", ("token_index", "d_model"), "residual entering the final norm"),
        ArraySpec("z", ("token_index", "layer", "head", "d_head"), "each head's hook_z"),
        ArraySpec("norm_scales", ("token_index", "norm"), "every norm's hook_scale, ln1/ln2 per layer then ln_final"),
        ArraySpec("mlp_post_final", ("token_index", "d_mlp"), "final MLP layer's hook_post"),
    )
}

# Weights saved beside the activations so a DE toward any token is a CPU computation.
WEIGHT_ARRAYS: dict[str, tuple[str, ...]] = {
    "W_O": ("layer", "head", "d_head", "d_model"),
    "W_U": ("d_model", "d_vocab"),
    "b_U": ("d_vocab",),
    "W_out_final": ("d_mlp", "d_model"),
}

WEIGHT_DOCS = {
    "W_O": "each head's output projection as the fast engine applies it (post-norm gain folded): "
           "a head's direct output is z[token, layer, head] @ W_O[layer, head]",
    "W_U": "processed unembedding: final-norm gain folded, centred over the vocabulary",
    "b_U": "processed unembedding bias (centred)",
    "W_out_final": "the last MLP's output projection (d_mlp × d_model)",
}

ARRAY_DTYPES = ("float16", "float32")


def validate_table(table: Table, batch: pa.Table) -> pa.Table:
    """Cast a batch to the table's schema, refusing missing or extra columns.

    Args:
        table: the schema to enforce.
        batch: an Arrow table produced by a writer.

    Returns:
        The batch with exactly the schema's columns, order and types.
    """
    from selfrepair.errors import SchemaMismatch

    got, want = set(batch.column_names), set(table.column_names)
    names = table.column_names
    if got != want and table.name in METRIC_COLUMNS and got == set(without_metrics(table.name)):
        names = list(without_metrics(table.name))  # a run without output metrics: those columns are absent
    elif got != want:
        raise SchemaMismatch(
            f"table {table.name}: missing {sorted(want - got)}, unexpected {sorted(got - want)}"
        )
    schema = pa.schema([table.arrow_schema.field(n) for n in names])
    try:
        return batch.select(names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise SchemaMismatch(f"table {table.name}: {e}") from None


# -- manifest and commit records -------------------------------------------------------
# Their fields, types and bounds are parsed in `store/manifest.py` and `store/records.py`.
# One JSON object per line of `commits/<generation>.jsonl`:
#   shard:   a shard's entry, committed (replacing the shards it supersedes in the same record;
#            when those were compacted, an optional `compacted` gives the files without their rows)
#   derived: a derived table's one file (replacing the previous one)
#   set:     top-level manifest keys replaced (n_rows, n_tokens, corpus, arrays, config, …)
#   compact: every table's compacted files (replacing the previous set: `compacted`), and the
#            shards whose rows they now hold: those keep their entry (the units `store/plan.py`
#            and `verify` read) with `files` emptied and `compacted` naming the tables moved
RECORD_OPS = ("shard", "derived", "set", "compact")
# `set` may not replace what shard and derived records own, the log pointer, nor the model
# (the arrays and every shard's heads are the model's).
SET_FORBIDDEN = ("shards", "derived", "log", "schema_version", "compacted", "model")
