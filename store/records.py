"""Commit-log records, parsed once into typed objects, and folded into a typed `Manifest`.

Each line of `commits/<generation>.jsonl` is one record (`store/schema.py` lists the ops).
A record is checked on its own when read (keys, types, bounds, paths), and against the
manifest it folds into (the heads a shard names must exist; a `set` must leave a valid
manifest), so a hostile log is refused with one `StoreError` line by every command.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Union

from selfrepair.errors import StoreError
from selfrepair.store.bounds import Fields, proxy
from selfrepair.store.manifest import (
    FileEntry, Manifest, ShardEntry, check_heads, parse_compacted, parse_derived, parse_shard, parse_top,
)
from selfrepair.store.schema import RECORD_OPS, SET_FORBIDDEN


@dataclass(frozen=True)
class ShardRecord:
    """A shard committed, replacing `supersedes` (and, when those were compacted, the compacted files)."""

    seq: int
    id: str
    entry: ShardEntry
    supersedes: tuple[str, ...]
    compacted: object = None  # Mapping[str, tuple[FileEntry, ...]] | None
    raw: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class DerivedRecord:
    """A derived table's one file, replacing the previous one."""

    seq: int
    table: str
    entry: FileEntry
    raw: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class SetRecord:
    """Top-level manifest keys replaced (validated when folded: the result must be a valid manifest)."""

    seq: int
    values: dict
    raw: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class CompactRecord:
    """Every table's compacted files, and the shards whose rows they now hold."""

    seq: int
    files: object  # Mapping[str, tuple[FileEntry, ...]]
    shards: tuple[str, ...]
    raw: dict = field(default_factory=dict, compare=False, repr=False)


Record = Union[ShardRecord, DerivedRecord, SetRecord, CompactRecord]


def parse_record(folder: Path, obj, seq: int, what: str) -> Record:
    """One commit record, refused with one line unless it is well formed, in bounds and in order."""
    f = Fields(obj, what)
    got = f.get("seq", int)
    if got != seq:
        raise StoreError(f"{what}: seq {got} where {seq} was expected")
    op = f.get("op", str)
    if op not in RECORD_OPS:
        raise StoreError(f"{what}: unknown op {op!r}")
    if op == "shard":
        sid = f.get("id", str)
        entry = parse_shard(folder, sid, f.get("entry", dict), what)
        compacted = parse_compacted(folder, obj["compacted"], what) if "compacted" in obj else None
        return ShardRecord(seq, sid, entry, f.texts("supersedes", default=_missing(f, "supersedes")), compacted, obj)
    if op == "derived":
        table = f.get("table", str)
        return DerivedRecord(seq, table, parse_derived(folder, table, f.get("entry", dict), what), obj)
    if op == "compact":
        files = parse_compacted(folder, f.get("files", dict), what)
        return CompactRecord(seq, files, f.texts("shards", default=_missing(f, "shards")), obj)
    values = f.get("values", dict)
    if any(k in SET_FORBIDDEN for k in values):
        raise StoreError(f"{what}: a set record may not replace {', '.join(SET_FORBIDDEN)} "
                         f"(it sets {', '.join(sorted(k for k in values if k in SET_FORBIDDEN))})")
    return SetRecord(seq, values, obj)


def _missing(f: Fields, key: str):
    if key not in f.obj:
        raise StoreError(f"{f.what} lacks the key {key!r}")
    return ()


class Fold:
    """Records folded into a manifest in place, in order; `result()` is the new frozen manifest.

    A log holds up to as many records as the manifest has shards: folding them one copy of
    the shard table at a time would cost O(shards²) per read.
    """

    def __init__(self, folder: Path, m: Manifest):
        self.folder, self.m = folder, m
        self.shards, self.derived, self.compacted = dict(m.shards), dict(m.derived), m.compacted

    def add(self, record: Record, what: str) -> None:
        m = self.m
        if isinstance(record, ShardRecord):
            check_heads(record.entry, record.id, m.model, what)
            for sid in record.supersedes:
                self.shards.pop(sid, None)
            self.shards[record.id] = record.entry
            if record.compacted is not None:
                self.compacted = record.compacted
        elif isinstance(record, DerivedRecord):
            self.derived[record.table] = record.entry
        elif isinstance(record, CompactRecord):
            for sid in record.shards:
                e = self.shards.get(sid)
                if e is not None:
                    moved = sorted(set(e.compacted) | set(e.files))
                    self.shards[sid] = replace(e, files=proxy({}), compacted=tuple(moved),
                                               raw=dict(e.raw) | {"files": {}, "compacted": moved})
            self.compacted = record.files
        else:  # a set record: the replaced keys are checked exactly as a manifest's own
            self.m = parse_top(self.folder, dict(m.raw) | record.values, what, m.shards, m.derived, m.compacted)

    def result(self) -> Manifest:
        return replace(self.m, shards=proxy(self.shards), derived=proxy(self.derived), compacted=self.compacted)


def apply(folder: Path, m: Manifest, record: Record, what: str) -> Manifest:
    """The manifest with one parsed record folded in (a new object: manifests are frozen)."""
    fold = Fold(folder, m)
    fold.add(record, what)
    return fold.result()
