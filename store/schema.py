"""The single source of truth for the store's tables and arrays (DESIGN.md, "Store").

Writers, readers, views, tests and the README import these definitions; nobody
retypes a column list. Key columns use the same dimension names as the tensors
and the Zarr arrays (`layer`, `head`, `token_index`, `neuron`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

# 2: commits go to an append-only log (`commits/<generation>.jsonl`) folded into the
# manifest at checkpoints. 1: every commit rewrote the manifest (read, never written).
SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)


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
    ),
    "one prediction: the token at (row, pos) predicting next_token_id, on the clean run",
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

ABLATION_EFFECTS = Table(
    "ablation_effects",
    ("ablation", "sample", "layer", "head", "token_index"),
    (
        ("ablation", STR),
        ("sample", I16),
        ("layer", I16),
        ("head", I16),
        ("token_index", I32),
        ("d_logit", F32),
        ("ln_scale", F32),
        ("de", F32),
        ("d_de_heads", F32),
        ("d_de_mlps", F32),
    ),
    "one head ablated on one token: change in logit, ablated final-norm scale and DEs",
)

ABLATION_TOP = Table(
    "ablation_top",
    ABLATION_EFFECTS.key,
    ABLATION_EFFECTS.columns,
    "the ablation_effects rows of each ablated head's top-p% tokens (the ingest's top_p): "
    "what per-head questions on top tokens read",
)

RESAMPLE_SOURCES = Table(
    "resample_sources",
    ("sample", "row"),
    (("sample", I16), ("row", I32), ("source_row", I32)),
    "for each resample draw, the row whose activations replace this row's",
)

REPAIR_SOURCES = Table(
    "repair_sources",
    ("ablation", "sample", "layer", "head", "token_index", "src_kind", "src_layer", "src_head"),
    (
        ("ablation", STR),
        ("sample", I16),
        ("layer", I16),
        ("head", I16),
        ("token_index", I32),
        ("src_kind", STR),
        ("src_layer", I16),
        ("src_head", I16),
        ("d_de", F32),
    ),
    "top-p% tokens only: the change in DE of each downstream head or MLP (src_head -1)",
)

NEURON_EFFECTS = Table(
    "neuron_effects",
    ("ablation", "sample", "layer", "head", "token_index", "neuron"),
    (
        ("ablation", STR),
        ("sample", I16),
        ("layer", I16),
        ("head", I16),
        ("token_index", I32),
        ("neuron", I32),
        ("rank", I16),
        ("de_clean", F32),
        ("de_ablated", F32),
    ),
    "detail tokens only (each head's top-p% tokens by clean DE, and by sr_mlps for the heads "
    "`--sr-mlps-neurons` names): the final-MLP neurons whose signed change in DE ranks in the "
    "top k or the bottom k; rank is the 1-based rank of de_ablated - de_clean, largest first, "
    "among all d_mlp neurons (rank > d_mlp - k: the bottom k)",
)

NEURON_TOTALS = Table(
    "neuron_totals",
    ("ablation", "sample", "layer", "head", "token_index"),
    (
        ("ablation", STR),
        ("sample", I16),
        ("layer", I16),
        ("head", I16),
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
    ("ablation", "sample", "layer", "head", "token_index", "rank"),
    (
        ("ablation", STR),
        ("sample", I16),
        ("layer", I16),
        ("head", I16),
        ("token_index", I32),
        ("rank", I16),
        ("src_pos", I16),
        ("src_token_index", I32),
        ("weight", F32),
    ),
    "top-p% tokens only: the k source positions the head attends to most on the clean run "
    "(rank 1 = largest weight); stored with each ablation draw's shard, the same rows in every draw",
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
        HEAD_TOP_TOKENS,
        VOCAB,
    )
}

# A table's columns as stores written before a change of its schema hold them: such files are
# still read, verified and compacted, never written. neuron_effects before `rank` (neurons
# then ranked by abs(change in DE), no neuron_totals).
LEGACY_COLUMNS: dict[str, tuple[tuple[str, ...], ...]] = {
    "neuron_effects": (("ablation", "sample", "layer", "head", "token_index", "neuron", "de_clean", "de_ablated"),),
}

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
    if got != want:
        raise SchemaMismatch(
            f"table {table.name}: missing {sorted(want - got)}, unexpected {sorted(got - want)}"
        )
    try:
        return batch.select(table.column_names).cast(table.arrow_schema)
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
