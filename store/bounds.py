"""The bounds of every manifest field, and typed, bounded access to one JSON object.

`store/manifest.py` and `store/records.py` read every field through `Fields`, so each value
out of its type or bounds is one `StoreError` naming the file, the field and the value.
The numeric bounds come from `store/schema.py` where a column holds the value (an int32
`token_index` cannot index more tokens), and are stated limits otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from selfrepair.errors import StoreError
from selfrepair.store.jsonread import LOG_MAX_BYTES, MANIFEST_MAX_BYTES, MAX_DEPTH, RECORD_MAX_BYTES
from selfrepair.store.schema import (
    ABLATION_KINDS, COUNTERFACTUAL_NAMES, DERIVED_TABLES, READABLE_SCHEMA_VERSIONS, RECORD_OPS, SET_FORBIDDEN, SHARD_PHASES, TABLES,
)

REQUIRED = object()


def _int_max(table: str, column: str) -> int:
    """The largest value a table's integer column holds (the store cannot index beyond it)."""
    return (1 << (dict(TABLES[table].columns)[column].bit_width - 1)) - 1


MAX_TOKENS = _int_max("tokens", "token_index")  # n_tokens, token ranges
MAX_ROWS = _int_max("tokens", "row")  # n_rows, shard row ranges
MAX_SEQ_LEN = _int_max("tokens", "pos") + 1
MAX_SAMPLE = _int_max("ablation_effects", "sample")
# Far above any released model (the largest have ~128 layers and heads); "all" heads of a
# bounded model is at most a million (layer, head) pairs, so no reader can be made to allocate more.
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_COUNT = 1 << 53  # file rows and bytes, array dimensions: integers JSON keeps exact
MAX_TEXT = 1 << 16  # ids, digests, head lists, names
# Stores whose config lacks a setting (written by hand, or before the key) read with the
# ingest's own default for it (ingest/config.py), here, once.
DEFAULT_TOP_P = 0.02
DEFAULT_BATCH_SIZE = 4
DEFAULT_NEURONS_TOP_K = 50

# field -> (type, bound): the closing note of issue 18 and `selfrepair verify`'s contract.
FIELD_BOUNDS = {
    "schema_version": ("int", f"one of {READABLE_SCHEMA_VERSIONS}"),
    "model.n_layers": ("int", f"1 ≤ n ≤ {MAX_LAYERS}; equal to the arrays' layer axis"),
    "model.n_heads": ("int", f"1 ≤ n ≤ {MAX_HEADS}; equal to the arrays' head axis"),
    "model.d_model, d_mlp, d_head, d_vocab": ("int, optional", f"0 ≤ n ≤ {MAX_COUNT}"),
    "model.name, hf_id": ("str, optional", f"≤ {MAX_TEXT} chars"),
    "model.norm_names": ("list[str], optional", f"≤ {MAX_TEXT} chars each"),
    "n_tokens": ("int", f"0 ≤ n ≤ {MAX_TOKENS} (int32 token_index)"),
    "n_rows": ("int, default 0", f"0 ≤ n ≤ {MAX_ROWS} (int32 row)"),
    "seq_len": ("int, default 0", f"0 ≤ n ≤ {MAX_SEQ_LEN} (int16 pos)"),
    "shards.<id>": ("object", f"id a non-empty str ≤ {MAX_TEXT} chars"),
    "shards.<id>.phase": ("str", f"one of {SHARD_PHASES}"),
    "shards.<id>.rows": ("[int, int]", f"0 ≤ r0 < r1 ≤ {MAX_ROWS}"),
    "shards.<id>.tokens": ("[int, int], optional", f"0 ≤ t0 ≤ t1 ≤ {MAX_TOKENS}"),
    "shards.<id>.files.<table>": ("file entry", "table a non-derived table of store/schema.py"),
    "shards.<id>.chunks": ("{path: sha256 | null}, optional", "path relative, under activations.zarr/"),
    "shards.<id>.ablation": ("str, optional", f"one of {ABLATION_KINDS}"),
    "shards.<id>.sample": ("int, default 0", f"0 ≤ n ≤ {MAX_SAMPLE} (int16 sample)"),
    "shards.<id>.heads": ("str, default 'all'", "heads that exist in the model (read when `units` is absent)"),
    "shards.<id>.units": ("str, optional (absent: the shard's `heads`, as head units)",
                          f"≤ {MAX_TEXT} chars; store/labels.py units (`units_spec`) that exist in the model"),
    "shards.<id>.condition": ("str, default '' (none)",
                              f"≤ {MAX_TEXT} chars; one store/labels.py unit in the model, sharing no component "
                              "with the shard's units"),
    "shards.<id>.top_n_tokens": ("int, optional", f"0 ≤ n ≤ {MAX_TOKENS}"),
    "shards.<id>.compacted": ("list[str], default []", "tables of store/schema.py"),
    "shards.<id>.heads_key, engine, pairs_sha, top_sha, detail_sha": ("str, optional", f"≤ {MAX_TEXT} chars"),
    "file entry .path": ("str", "relative, inside the model folder (no symlink out), under tables/<table>/"),
    "file entry .rows, .bytes": ("int", f"0 ≤ n ≤ {MAX_COUNT}"),
    "file entry .sha256": ("str", f"≤ {MAX_TEXT} chars"),
    "derived.<table>": ("file entry", f"table one of {DERIVED_TABLES}"),
    "derived.<table>.n_tokens": ("int, optional", f"0 ≤ n ≤ {MAX_TOKENS}"),
    "derived.<table>.top_p": ("float, optional", "0 < p ≤ 1"),
    "compacted.<table>": ("list[file entry], default {}", "table of store/schema.py"),
    "arrays.<name>.shape": ("list[int]", f"0 ≤ n ≤ {MAX_COUNT} each"),
    "arrays.<name>.dims, dtype": ("list[str], str", "str"),
    "ablations": ("list[str], optional", f"each one of {ABLATION_KINDS}"),
    "resample.samples": ("int, default 1", f"1 ≤ n ≤ {MAX_SAMPLE + 1}"),
    "resample.batch_size, config.batch_size": ("int, optional", f"1 ≤ n ≤ {MAX_ROWS}"),
    "config.top_p": ("float, default 0.02", "0 < p ≤ 1"),
    "config.neurons_top_k": ("int, default 50", f"0 ≤ n ≤ {MAX_COUNT}"),
    "config.resamples": ("int, default 1", f"1 ≤ n ≤ {MAX_SAMPLE + 1}"),
    "config.ablations": ("list[str], default ['resample']", f"each one of {ABLATION_KINDS}"),
    "config.heads_runs, sr_mlps_neurons_runs": ("list[str], default []", f"≤ {MAX_TEXT} chars each"),
    "config.counterfactuals": ("list[str], default []", f"each one of {COUNTERFACTUAL_NAMES}"),
    "corpus.fingerprint, spec / corpus.rows": ("str / int, optional", f"0 ≤ rows ≤ {MAX_ROWS}"),
    "log.generation": ("int, optional (schema 1: none)", f"0 ≤ n ≤ {MAX_COUNT}"),
    "identity, preset, versions, self_check, top_token_rule": ("JSON, optional", "kept as written"),
    "manifest.json": ("regular file (no symlink, FIFO or device)",
                      f"≤ {MANIFEST_MAX_BYTES} bytes; JSON ≤ {MAX_DEPTH} levels deep"),
    "commits/<generation>.jsonl": ("regular file in a real folder", f"≤ {LOG_MAX_BYTES} bytes"),
    "commit record": ("one JSON object per line", f"≤ {RECORD_MAX_BYTES} bytes, ≤ {MAX_DEPTH} levels deep"),
    "record.seq": ("int", "its line number in the log"),
    "record.op": ("str", f"one of {RECORD_OPS}"),
    "record (set).values": ("object", f"no key of {SET_FORBIDDEN}; the result a valid manifest"),
    "record (shard).supersedes, (compact).shards": ("list[str]", "shard ids"),
}


# -- field readers -------------------------------------------------------------------------
def type_ok(value, want) -> bool:
    # bool is an int to Python; JSON true is never a count or an index here.
    if isinstance(value, bool):
        return want is bool
    if want is float:
        return isinstance(value, (int, float))
    return isinstance(value, want)


def show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Fields:
    """Typed, bounded access to one JSON object; every message names `what` and the key."""

    def __init__(self, obj, what: str):
        if not isinstance(obj, dict):
            raise StoreError(f"{what} is a JSON {type(obj).__name__}, not an object")
        self.obj, self.what = obj, what

    def fail(self, key: str, why: str):
        raise StoreError(f"{self.what}: {key} {why}")

    def get(self, key: str, want, default=REQUIRED):
        value = self.obj.get(key)
        if value is None:
            if default is REQUIRED:
                raise StoreError(f"{self.what} lacks the key {key!r}")
            return default
        if not type_ok(value, want):
            raise StoreError(f"{self.what}: {key!r} has the wrong type ({type(value).__name__}: {show(value)})")
        return value

    def count(self, key: str, hi: int, lo: int = 0, default=REQUIRED) -> int:
        value = self.get(key, int, default)
        if value is not default and not lo <= value <= hi:
            self.fail(key, f"is {show(value)}, outside [{lo}, {hi}]")
        return value

    def text(self, key: str, default=REQUIRED) -> str:
        value = self.get(key, str, default)
        if value is not default and len(value) > MAX_TEXT:
            self.fail(key, f"has {len(value)} characters, over the limit of {MAX_TEXT}")
        return value

    def fraction(self, key: str, default=REQUIRED) -> float:
        value = self.get(key, float, default)
        if value is not default and not 0 < value <= 1:
            self.fail(key, f"is {show(value)}, outside (0, 1]")
        return value

    def texts(self, key: str, choices=None, default=()) -> tuple[str, ...]:
        value = self.get(key, list, default)
        for v in value:
            if not isinstance(v, str) or len(v) > MAX_TEXT or (choices is not None and v not in choices):
                want = f"one of {tuple(choices)}" if choices is not None else "a string"
                self.fail(key, f"holds {show(v)}, not {want}")
        return tuple(value)

    def obj_(self, key: str) -> dict:
        return self.get(key, dict, {})


def proxy(d: dict) -> Mapping:
    return MappingProxyType(d)
