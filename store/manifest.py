"""The manifest, its shard and file entries, and the commit records, parsed once into typed objects.

Every reader gets these frozen objects from `store/snapshot.py`; nobody indexes the raw JSON
or supplies a default of its own. Each field is checked for its JSON type and its
bounds (`store/bounds.py` lists them: `FIELD_BOUNDS`); a value out of bounds is one
`StoreError` naming the file, the field and the value. A store written before an optional key existed reads with the
default given here, once. Objects keep the JSON they came from (`raw`) so the writer
re-serialises exactly what it read: the on-disk format does not change.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from selfrepair.errors import ConfigError, StoreError
from selfrepair.store import files
from selfrepair.store.bounds import (
    DEFAULT_NEURONS_TOP_K, DEFAULT_TOP_P, MAX_COUNT, MAX_HEADS, MAX_LAYERS, MAX_ROWS, MAX_SAMPLE, MAX_SEQ_LEN,
    MAX_TEXT, MAX_TOKENS, REQUIRED, Fields, proxy, show, type_ok,
)
from selfrepair.store.heads import parse_heads
from selfrepair.store.labels import Unit, head_unit, parse_units
from selfrepair.store.schema import ABLATION_KINDS, COUNTERFACTUAL_NAMES, DERIVED_TABLES, READABLE_SCHEMA_VERSIONS, SHARD_PHASES, TABLES


# -- entries ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileEntry:
    """One committed Parquet file: its path inside the model folder, row count, size and checksum.

    Derived tables' entries also carry the token count (`n_tokens`) and `top_p` they were built for.
    """

    path: str
    rows: int
    bytes: int
    sha256: str
    n_tokens: int | None = None
    top_p: float | None = None
    raw: Mapping = field(default_factory=dict, compare=False, repr=False)


def parse_file(folder: Path, table: str, obj, what: str) -> FileEntry:
    f = Fields(obj, what)
    path = f.text("path")
    files.inside(folder, path)
    if not path.startswith(f"tables/{table}/") or not path.endswith(".parquet"):
        f.fail("path", f"{path!r} is not a file of table {table} (tables/{table}/*.parquet)")
    return FileEntry(path, f.count("rows", MAX_COUNT), f.count("bytes", MAX_COUNT), f.text("sha256"),
                     f.count("n_tokens", MAX_TOKENS, default=None), f.fraction("top_p", default=None), obj)


@dataclass(frozen=True)
class ShardEntry:
    """One committed shard: a batch of rows of one phase (clean, an ablation draw, neuron detail)."""

    phase: str
    rows: tuple[int, int]
    files: Mapping[str, FileEntry]
    tokens: tuple[int, int] | None = None
    chunks: Mapping[str, str | None] = field(default_factory=dict)
    ablation: str | None = None  # None: a legacy ablation shard holding every stored kind
    sample: int = 0
    heads: str = "all"  # what a shard written before units ablated (its `units` absent)
    heads_key: str | None = None
    engine: str | None = None
    pairs_sha: str | None = None
    top_n_tokens: int | None = None  # None: written before the key, for the manifest's n_tokens
    top_sha: str | None = None
    detail_sha: str | None = None
    compacted: tuple[str, ...] = ()  # tables whose rows moved into the compacted files
    units: str | None = None  # store/labels.py `units_spec` text; None: written before units (`heads`)
    condition: str = ""  # the condition unit's spec; "": none
    raw: Mapping = field(default_factory=dict, compare=False, repr=False)

    @property
    def draw(self) -> tuple[str | None, int]:
        return self.ablation, self.sample

    def unit_list(self, n_layers: int, n_heads: int) -> tuple[Unit, ...]:
        """The units this shard ablated: its `units`, or, written before units, its `heads` as head units.

        Raises:
            ConfigError: a unit outside the model (the manifest's readers refuse such a shard first).
        """
        return shard_units(self.units, self.heads, n_layers, n_heads)

    def condition_unit(self, n_layers: int, n_heads: int) -> Unit | None:
        """The unit ablated under every unit of this shard (None: unconditioned)."""
        return condition_unit(self.condition, n_layers, n_heads)

    def condition_label(self, n_layers: int, n_heads: int) -> str:
        """The `condition` column of this shard's rows ("" for none)."""
        unit = self.condition_unit(n_layers, n_heads)
        return "" if unit is None else unit.label

    def holds(self, table: str) -> bool:
        """Whether this shard's rows of `table` exist (in its own file or a compacted one)."""
        return table in self.files or table in self.compacted


def _pair(f: Fields, key: str, hi: int, strict: bool, default=REQUIRED):
    value = f.get(key, list, default)
    if value is default:
        return value
    if len(value) != 2 or not all(type_ok(v, int) for v in value) \
            or not (0 <= value[0] < value[1] <= hi if strict else 0 <= value[0] <= value[1] <= hi):
        f.fail(key, f"{show(value)} is not a range inside [0, {hi}]")
    return tuple(value)


def parse_shard(folder: Path, shard_id, obj, what: str) -> ShardEntry:
    """A shard entry's keys, types, bounds and paths (every path inside `folder`)."""
    if not isinstance(shard_id, str) or not shard_id or len(shard_id) > MAX_TEXT:
        raise StoreError(f"{what}: a shard id is not a string ({show(shard_id)})")
    what = f"{what}, shard {shard_id}"
    f = Fields(obj, what)
    phase = f.get("phase", str)
    if phase not in SHARD_PHASES:
        f.fail("phase", f"is {show(phase)}, not one of {SHARD_PHASES}")
    rows = _pair(f, "rows", MAX_ROWS, strict=True)
    entries = {}
    for table, e in f.get("files", dict).items():
        if table not in TABLES or table in DERIVED_TABLES:
            raise StoreError(f"{what}: unknown table {table!r}")
        entries[table] = parse_file(folder, table, e, f"{what}, table {table}")
    chunks = f.obj_("chunks")
    for rel, digest in chunks.items():
        files.check_name(folder, rel)  # only verify opens chunk files, and checks them fully (`inside`) first
        if not rel.startswith("activations.zarr/"):
            f.fail("chunks", f"names {rel!r}, not a file under activations.zarr/")
        if digest is not None and not isinstance(digest, str):
            raise StoreError(f"{what}: chunk {rel} has no valid checksum")
    ablation = f.text("ablation", None)
    if ablation is not None and ablation not in ABLATION_KINDS:
        f.fail("ablation", f"is {show(ablation)}, not one of {ABLATION_KINDS}")
    return ShardEntry(
        phase, rows, proxy(entries), _pair(f, "tokens", MAX_TOKENS, strict=False, default=None), proxy(chunks),
        ablation, f.count("sample", MAX_SAMPLE, default=0), f.text("heads", "all"), f.text("heads_key", None),
        f.text("engine", None), f.text("pairs_sha", None), f.count("top_n_tokens", MAX_TOKENS, default=None),
        f.text("top_sha", None), f.text("detail_sha", None), f.texts("compacted", TABLES), f.text("units", None),
        f.text("condition", ""), obj)


def parse_compacted(folder: Path, obj, what: str) -> Mapping[str, tuple[FileEntry, ...]]:
    """The compacted files of each table: a list of file entries, every path inside `folder`."""
    if not isinstance(obj, dict):
        raise StoreError(f"{what}: compacted is not an object")
    out = {}
    for table, entries in obj.items():
        if table not in TABLES or table in DERIVED_TABLES or not isinstance(entries, list):
            raise StoreError(f"{what}: compacted table {table!r} is unknown or not a list")
        out[table] = tuple(parse_file(folder, table, e, f"{what}, compacted {table}") for e in entries)
    return proxy(out)


def parse_derived(folder: Path, table, obj, what: str) -> FileEntry:
    if table not in DERIVED_TABLES:
        raise StoreError(f"{what}: unknown derived table {table!r} (derived tables: {', '.join(DERIVED_TABLES)})")
    return parse_file(folder, table, obj, f"{what}, derived {table}")


# -- the manifest ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelFacts:
    """The architecture facts readers use; the rest of the model's record stays in `raw`."""

    n_layers: int
    n_heads: int
    name: str | None = None
    hf_id: str | None = None
    d_model: int | None = None
    d_mlp: int | None = None
    d_head: int | None = None
    d_vocab: int | None = None
    norm_names: tuple[str, ...] = ()
    raw: Mapping = field(default_factory=dict, compare=False, repr=False)
    revision: str | None = None  # the Hugging Face revision (a training checkpoint) ingested, if one was asked
    post_norm: bool = False  # post-norm blocks (Gemma 2/3, OLMo 2): a head's write divides by a per-block scale


def parse_model(obj, what: str) -> ModelFacts:
    f = Fields(obj, f"{what}, model")
    dims = [f.count(k, MAX_COUNT, default=None) for k in ("d_model", "d_mlp", "d_head", "d_vocab")]
    return ModelFacts(f.count("n_layers", MAX_LAYERS, 1), f.count("n_heads", MAX_HEADS, 1), f.text("name", None),
                      f.text("hf_id", None), *dims, f.texts("norm_names"), proxy(obj), revision=f.text("revision", None),
                      post_norm=f.get("post_norm_blocks", bool, False))


@dataclass(frozen=True)
class ArrayInfo:
    """One stored Zarr array as the manifest records it."""

    shape: tuple[int, ...]
    dims: tuple[str, ...]
    dtype: str
    raw: Mapping = field(default_factory=dict, compare=False, repr=False)


def parse_array(name: str, obj, what: str) -> ArrayInfo:
    f = Fields(obj, f"{what}, array {name}")
    shape = f.get("shape", list)
    if not all(type_ok(n, int) and 0 <= n <= MAX_COUNT for n in shape):
        f.fail("shape", f"{show(shape)} is not a list of sizes inside [0, {MAX_COUNT}]")
    return ArrayInfo(tuple(shape), f.texts("dims"), f.text("dtype", ""), obj)


@dataclass(frozen=True)
class RunConfig:
    """The ingest settings readers use (the full record of the run stays in `raw`)."""

    top_p: float = DEFAULT_TOP_P
    batch_size: int | None = None
    neurons_top_k: int = DEFAULT_NEURONS_TOP_K
    resamples: int = 1
    ablations: tuple[str, ...] = ("resample",)
    heads_runs: tuple[str, ...] = ()
    sr_mlps_neurons_runs: tuple[str, ...] = ()
    raw: Mapping = field(default_factory=dict, compare=False, repr=False)
    counterfactuals: tuple[str, ...] = ()  # the re-runs stored (`--counterfactuals`); none before they existed


def parse_config(obj, what: str) -> RunConfig:
    f = Fields(obj, f"{what}, config")
    return RunConfig(f.fraction("top_p", DEFAULT_TOP_P), f.count("batch_size", MAX_ROWS, 1, default=None),
                     f.count("neurons_top_k", MAX_COUNT, default=DEFAULT_NEURONS_TOP_K),
                     f.count("resamples", MAX_SAMPLE + 1, 1, default=1),
                     f.texts("ablations", ABLATION_KINDS, ("resample",)), f.texts("heads_runs"),
                     f.texts("sr_mlps_neurons_runs"), proxy(obj),
                     f.texts("counterfactuals", COUNTERFACTUAL_NAMES, ()))


@dataclass(frozen=True)
class Resample:
    """How resample sources were drawn: draws per kind, the pairing rule and its batch size."""

    samples: int = 1
    batch_size: int | None = None
    seed: int | None = None
    rule: str | None = None
    raw: Mapping = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Corpus:
    spec: str | None = None
    fingerprint: str | None = None
    rows: int = 0
    raw: Mapping = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class LogPointer:
    """Which commit log generation (`commits/<generation>.jsonl`) continues this checkpoint."""

    generation: int


@dataclass(frozen=True)
class Manifest:
    """One model folder's snapshot: the checkpoint with its commit log folded in."""

    schema_version: int
    model: ModelFacts
    n_tokens: int
    shards: Mapping[str, ShardEntry]
    n_rows: int = 0
    seq_len: int = 0
    derived: Mapping[str, FileEntry] = field(default_factory=dict)
    compacted: Mapping[str, tuple[FileEntry, ...]] = field(default_factory=dict)
    arrays: Mapping[str, ArrayInfo] = field(default_factory=dict)
    config: RunConfig = RunConfig()
    resample: Resample = Resample()
    corpus: Corpus = Corpus()
    ablations: tuple[str, ...] = ()  # empty: written before the key (every kind may be stored)
    identity: Mapping = field(default_factory=dict)
    self_check: object = None
    log: LogPointer | None = None
    raw: Mapping = field(default_factory=dict, compare=False, repr=False)

    @property
    def ablation_kinds(self) -> tuple[str, ...]:
        """The ablation kinds this store may hold (every kind when the manifest predates the key)."""
        return self.ablations or ABLATION_KINDS

    @property
    def batch_size(self) -> int | None:
        """Rows per full batch: the pairing rule's, else the config's (None: not recorded)."""
        return self.resample.batch_size or self.config.batch_size

    def arrays_json(self) -> dict:
        return {name: dict(a.raw) for name, a in self.arrays.items()}

    def to_json(self) -> dict:
        """The manifest as JSON objects, exactly as read (plus what records changed)."""
        out = {k: v for k, v in self.raw.items() if k not in ("shards", "derived", "compacted")}
        out["shards"] = {sid: dict(e.raw) for sid, e in self.shards.items()}
        out["derived"] = {t: dict(e.raw) for t, e in self.derived.items()}
        if self.compacted or "compacted" in self.raw:
            out["compacted"] = {t: [dict(e.raw) for e in lst] for t, lst in self.compacted.items()}
        return out


@functools.lru_cache(maxsize=1024)  # a store has few distinct unit sets; specs are ≤ MAX_TEXT each
def shard_units(units: str | None, heads: str, n_layers: int, n_heads: int) -> tuple[Unit, ...]:
    """A shard's units from its entry's text: `units`, or (None) its `heads` as head units."""
    if units is None:
        return tuple(head_unit(l, h) for l, h in parse_heads(heads, n_layers, n_heads))
    return tuple(parse_units(units, n_layers, n_heads, flag="units"))


@functools.lru_cache(maxsize=1024)
def condition_unit(spec: str, n_layers: int, n_heads: int) -> Unit | None:
    """A shard's condition from its entry's text ("" for none).

    Raises:
        ConfigError: not exactly one unit inside the model.
    """
    if not spec:
        return None
    units = parse_units(spec, n_layers, n_heads, flag="condition")
    if len(units) != 1:
        raise ConfigError(f"condition: {spec!r} names {len(units)} units, not one")
    return units[0]


def check_heads(entry: ShardEntry, sid: str, model: ModelFacts, what: str) -> None:
    """Refuse a shard naming a unit (or a condition) the model does not have, or a unit inside its condition."""
    size = f"the model's {model.n_layers} layers × {model.n_heads} heads"
    try:
        units = entry.unit_list(model.n_layers, model.n_heads)
    except ConfigError as e:
        if entry.units is None:
            raise StoreError(f"{what}, shard {sid}: heads {show(entry.heads)} name heads outside {size}") from None
        raise StoreError(f"{what}, shard {sid}: units {show(entry.units)} do not fit {size} ({e})") from None
    try:
        cond = entry.condition_unit(model.n_layers, model.n_heads)
    except ConfigError as e:
        raise StoreError(f"{what}, shard {sid}: condition {show(entry.condition)} does not fit {size} ({e})") from None
    if cond is not None:
        inside = [u.label for u in units if u.overlaps(cond, model.n_heads)]
        if inside:
            raise StoreError(f"{what}, shard {sid}: unit {inside[0]} shares a component with its condition "
                             f"{cond.label}")


# Array axes that hold the model's layers and heads (store/schema.py's dimension names).
_AXES = {"layer": "n_layers", "head": "n_heads"}


def check_model_arrays(m: Manifest, what: str) -> None:
    """The model's layer and head counts must be the stored arrays' (a hostile record cannot claim 99 × 99)."""
    for name, a in m.arrays.items():
        for dim, size in zip(a.dims, a.shape):
            want = getattr(m.model, _AXES[dim]) if dim in _AXES else None
            if want is not None and size != want:
                raise StoreError(f"{what}: model.{_AXES[dim]} is {want}, but array {name} has {size} along {dim}")


def parse_top(folder: Path, obj, what: str, shards, derived, compacted) -> Manifest:
    f = Fields(obj, what)
    version = f.get("schema_version", int)
    if version not in READABLE_SCHEMA_VERSIONS:
        raise StoreError(f"{what}: schema_version {version} is not one this selfrepair reads "
                         f"({', '.join(map(str, READABLE_SCHEMA_VERSIONS))}); upgrade selfrepair")
    model = parse_model(f.get("model", dict), what)
    n_tokens = f.count("n_tokens", MAX_TOKENS)
    resample = Fields(f.obj_("resample"), f"{what}, resample")
    corpus = Fields(f.obj_("corpus"), f"{what}, corpus")
    log = f.get("log", dict, None)
    if log is not None:
        log = LogPointer(Fields(log, f"{what}, log").count("generation", MAX_COUNT))
    arrays = {name: parse_array(name, a, what) for name, a in f.obj_("arrays").items()}
    self_check = f.get("self_check", (dict, list), None)
    for key in ("identity", "versions", "preset"):
        f.get(key, dict, None)
    f.text("top_token_rule", None)
    m = Manifest(
        version, model, n_tokens, shards, f.count("n_rows", MAX_ROWS, default=0),
        f.count("seq_len", MAX_SEQ_LEN, default=0), derived, compacted, proxy(arrays),
        parse_config(f.obj_("config"), what),
        Resample(resample.count("samples", MAX_SAMPLE + 1, 1, default=1),
                 resample.count("batch_size", MAX_ROWS, 1, default=None), resample.get("seed", int, None),
                 resample.text("rule", None), proxy(resample.obj)),
        Corpus(corpus.text("spec", None), corpus.text("fingerprint", None), corpus.count("rows", MAX_ROWS, default=0),
               proxy(corpus.obj)),
        f.texts("ablations", ABLATION_KINDS), proxy(f.obj_("identity")), self_check, log, proxy(obj))
    check_model_arrays(m, what)
    return m


def parse_manifest(folder: Path, obj, what: str) -> Manifest:
    """Refuse a manifest that is not the shape and bounds above, with one line; else its typed snapshot."""
    f = Fields(obj, what)
    f.get("schema_version", int)
    shards = {sid: parse_shard(folder, sid, e, what) for sid, e in f.get("shards", dict).items()}
    derived = {t: parse_derived(folder, t, e, what) for t, e in f.obj_("derived").items()}
    m = parse_top(folder, obj, what, proxy(shards), proxy(derived),
                   parse_compacted(folder, f.obj_("compacted"), what))
    for sid, e in shards.items():
        check_heads(e, sid, m.model, what)
    return m

