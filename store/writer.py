"""The write protocol of a model folder: lock, snapshot, shard commits, checkpoints, cleanup.

Committing a shard writes its files (temporary name, fsync, rename), then appends one
small record to the commit log and fsyncs it: the cost is the same at the 8,000th shard
as at the first. When the log holds as many records as the manifest holds shards (and at
least CHECKPOINT_MIN_RECORDS), it is folded into `manifest.json` under the next log
generation, so checkpoint bytes stay proportional to what was committed (amortised
constant per commit) and a reader never has a long log to replay.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from selfrepair.errors import StoreError
from selfrepair.store import arrays, faults, files, records, shards, snapshot
from selfrepair.store.compacted_files import without_shards
from selfrepair.store.lock import LOCK_NAME, WriterLock
from selfrepair.store.manifest import Manifest, parse_manifest
from selfrepair.store.model_store import ARRAYS_DIR, ModelStore
from selfrepair.store.schema import SCHEMA_VERSION

CHECKPOINT_MIN_RECORDS = 256


class Writer:
    """The one writer of a model folder. Use `Writer.open(ms)` as a context manager.

    `manifest` is the live typed snapshot (checkpoint plus every record appended so far), kept
    in memory and updated per commit, never re-read. Each record is parsed as a reader would
    parse it before it is appended, so the writer cannot commit what a reader would refuse.
    """

    def __init__(self, ms: ModelStore):
        self.ms = ms
        self.lock = WriterLock(ms.path)
        self.manifest: Manifest | None = None
        self.generation = -1
        self.n_records = 0
        self._fd: int | None = None

    @classmethod
    def open(cls, ms: ModelStore) -> "Writer":
        """Create the model folder if needed, take its lock (or raise StoreBusy) and read its snapshot."""
        files.ensure_writable_dir(ms.path)
        for name in ("tables", snapshot.LOG_DIR, ARRAYS_DIR):
            if (ms.path / name).is_symlink():  # every write and removal must provably stay inside the folder
                raise StoreError(f"{ms.path / name} is a symlink; a model folder's {name} must lie inside it")
        w = cls(ms)
        w.lock.acquire()
        try:
            w._load()
        except BaseException:
            w.lock.release()
            raise
        return w

    def _load(self) -> None:
        if not self.ms.exists():  # a dangling manifest symlink is read (and refused), never replaced
            return
        self.manifest, self.generation, self.n_records = snapshot.read(self.ms.path)
        if self.generation < 0:
            return  # a schema-1 store: its first commit starts a log (see _append)
        path = snapshot.log_path(self.ms.path, self.generation)
        _, complete, _ = snapshot.read_log(self.ms.path, self.generation)
        self._fd = files.open_regular(path, os.O_WRONLY | os.O_APPEND, "commit log")  # never truncated through a link
        if os.fstat(self._fd).st_size != complete:
            os.ftruncate(self._fd, complete)  # drop a record torn by a crash mid-append

    # -- life cycle --------------------------------------------------------------------
    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close(fold=exc[0] is None)

    def close(self, fold: bool = True) -> None:
        """Fold the log into the manifest (after a clean run) and release the lock."""
        try:
            if fold and self.manifest is not None and self.n_records:
                self.checkpoint()
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self.lock.release()

    def create(self, manifest: dict) -> None:
        """Start a fresh store from `manifest` (no shards), replacing whatever the folder holds."""
        self._remove_contents()
        fresh = manifest | {"shards": {}, "derived": {}, "schema_version": SCHEMA_VERSION}
        self.manifest = parse_manifest(self.ms.path, fresh, f"new manifest of {self.ms.path}")
        self.generation = -1
        self.checkpoint()

    def _remove_contents(self) -> None:
        # Direct children of the folder, never following a symlink: rmtree does not follow
        # the ones inside, and a symlink child is removed as a link. The lock stays.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for child in sorted(self.ms.path.iterdir()):
            if child.name == LOCK_NAME:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink(missing_ok=True)

    def checkpoint(self) -> None:
        """Fold the log into `manifest.json` under the next generation, then drop the old log."""
        gen = self.generation + 1
        new_log = snapshot.log_path(self.ms.path, gen)
        files.atomic_write_bytes(new_log, b"")  # exists before the manifest names it
        faults.point("writer.checkpoint.log_created")
        checkpoint = self.manifest.to_json() | {"log": {"generation": gen}, "schema_version": SCHEMA_VERSION}
        files.atomic_write_json(self.ms.manifest_path, checkpoint)
        faults.point("writer.checkpoint.renamed")
        if self._fd is not None:
            os.close(self._fd)
        old, self.generation, self.n_records = self.generation, gen, 0
        self._fd = os.open(new_log, os.O_WRONLY | os.O_APPEND)
        if old >= 0:
            files.remove_inside(self.ms.path, snapshot.log_path(self.ms.path, old))
        faults.point("writer.checkpoint.done")

    # -- commits -----------------------------------------------------------------------
    def _append(self, record: dict) -> None:
        if self._fd is None:
            self.checkpoint()
        record = {"seq": self.n_records, **record}
        path = snapshot.log_path(self.ms.path, self.generation)
        what = f"new commit record {self.n_records} of {path}"
        parsed = records.parse_record(self.ms.path, record, self.n_records, what)
        manifest = records.apply(self.ms.path, self.manifest, parsed, what)
        line = json.dumps(record, separators=(",", ":"), sort_keys=True).encode() + b"\n"
        files.append_line(self._fd, path, line)
        self.manifest = manifest
        self.n_records += 1
        if self.n_records >= max(CHECKPOINT_MIN_RECORDS, len(self.manifest.shards)):
            self.checkpoint()

    def commit(self, shard_id: str, entry: dict, tables: dict[str, pa.Table], supersedes=()) -> None:
        """Write a shard's tables, then commit its entry; `supersedes` leave the snapshot in the same record."""
        self.commit_written(shard_id, shards.write_shard(self.ms, shard_id, entry, tables), supersedes)

    def commit_clean(self, shard_id: str, rows: tuple[int, int], tokens: tuple[int, int],
                     tables: dict[str, pa.Table], values: dict[str, np.ndarray], supersedes=()) -> None:
        """A clean shard: its Zarr region (whole chunks, checksummed for `verify`), then its tables."""
        entry = shards.write_clean_shard(self.ms, shard_id, rows, tokens, tables, values)
        self.commit_written(shard_id, entry, supersedes)

    def commit_written(self, shard_id: str, entry: dict, supersedes=()) -> None:
        """Commit a shard whose files are written (`store/shards.py`, possibly by another process).

        Args:
            shard_id: the shard's id.
            entry: the entry `shards.write_shard` or `shards.write_clean_shard` returned.
            supersedes: stored shards that leave the snapshot in the same record.
        """
        record = {"op": "shard", "id": shard_id, "entry": entry, "supersedes": sorted(supersedes)}
        shards = self.manifest.shards
        if any(sid in shards and shards[sid].compacted for sid in supersedes):
            # The superseded rows share compacted files with others: the same record swaps
            # in copies of those files without them (rare: a redone batch after compaction).
            record["compacted"] = without_shards(self.ms, self.manifest, supersedes)
        faults.point(f"writer.shard.{entry.get('phase')}.written")
        self._append(record)
        faults.point(f"writer.shard.{entry.get('phase')}.appended")

    def commit_compaction(self, files_by_table: dict[str, list[dict]], shard_ids: list[str]) -> None:
        """Swap in compacted files: one record replaces the compacted set and empties those shards' files."""
        self._append({"op": "compact", "files": files_by_table, "shards": sorted(shard_ids)})

    def set(self, **values) -> None:
        """Replace top-level manifest keys (n_rows, n_tokens, corpus, arrays, config, …) in one record."""
        self._append({"op": "set", "values": values})
        faults.point("writer.set.appended")

    def write_derived(self, table: str, data: pa.Table, meta: dict) -> None:
        """Replace a derived table's one file (the old one is an orphan for the next start-up cleanup)."""
        entry = self.ms.write_shard_files(f"derived-{meta['n_tokens']}", {table: data})[table] | meta
        faults.point(f"writer.derived.{table}.written")
        self._append({"op": "derived", "table": table, "entry": entry})
        faults.point(f"writer.derived.{table}.appended")

    def prepare_arrays(self, shapes: dict[str, tuple[int, ...]], chunk_tokens: int, dtype: str,
                       weights: dict[str, np.ndarray]) -> None:
        """Create or grow the activation arrays; save the weights once."""
        arrays.check_tree(self.ms.arrays_path)  # no chunk written through a symlink, no FIFO blocking a resize
        arrays.create_arrays(self.ms.arrays_path, shapes, chunk_tokens, dtype)
        if weights and not (self.ms.arrays_path / "weights").exists():
            arrays.write_weights(self.ms.arrays_path, weights)

    # -- cleanup -----------------------------------------------------------------------
    def clean_orphans(self) -> list[Path]:
        """Delete what no committed entry lists: leftovers of a killed run, superseded shards, old logs.

        Only files whose folder provably lies inside the model folder are touched.
        """
        root = self.ms.path
        listed = {e.path for s in self.manifest.shards.values() for e in s.files.values()}
        listed |= {e.path for e in self.manifest.derived.values()}
        listed |= {e.path for lst in self.manifest.compacted.values() for e in lst}
        removed = []
        tables_dir = root / "tables"
        if tables_dir.is_dir() and not tables_dir.is_symlink():
            for folder, _, names in os.walk(tables_dir, followlinks=False):
                for name in names:
                    p = Path(folder) / name
                    if str(p.relative_to(root)) not in listed and files.remove_inside(root, p):
                        removed.append(p)
                        faults.point("writer.orphan.removed")
        log_dir = root / snapshot.LOG_DIR
        current = snapshot.log_path(root, self.generation).name
        if log_dir.is_dir() and not log_dir.is_symlink():
            for p in log_dir.iterdir():
                if p.name != current and files.remove_inside(root, p):
                    removed.append(p)
                    faults.point("writer.orphan.removed")
        for p in root.glob(".*.tmp"):
            if files.remove_inside(root, p):
                removed.append(p)
                faults.point("writer.orphan.removed")
        return removed


def write_manifest(ms: ModelStore, manifest: dict) -> None:
    """Start a model folder afresh from `manifest` (for fixtures and benchmarks; ingest keeps a Writer open)."""
    with Writer.open(ms) as w:
        w.create(manifest)


def commit_shard(ms: ModelStore, shard_id: str, entry: dict) -> None:
    """Commit one shard whose files are written (a whole writer session per call: for small fixtures)."""
    with Writer.open(ms) as w:
        w._append({"op": "shard", "id": shard_id, "entry": entry, "supersedes": []})
