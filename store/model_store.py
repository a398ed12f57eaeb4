"""One model's folder in a store root: manifest, commit log, Parquet shards, Zarr activations.

A shard becomes visible only when its record is appended to the commit log, after every
file of the shard is written and checksummed (`store/writer.py`). Readers list files
from one snapshot (manifest checkpoint plus log, `store/snapshot.py`), never by
globbing, so they never see half a shard.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from selfrepair.errors import StoreError, StoreNotFound
from selfrepair.store import files, snapshot
from selfrepair.store.manifest import FileEntry, Manifest
from selfrepair.store.schema import TABLES, validate_table

MANIFEST = snapshot.MANIFEST_NAME
ARRAYS_DIR = "activations.zarr"


def model_dirname(model: str) -> str:
    """A model id as a folder name: `EleutherAI/pythia-410m` -> `EleutherAI--pythia-410m`; `@` is kept, as in
    `pythia-160m@step1000` (a revision stored as its own model)."""
    return re.sub(r"[^A-Za-z0-9._@-]+", "--", model.strip("/")).strip("-") or "model"


@dataclass
class ModelStore:
    """A model's folder. Cheap to construct; nothing is read until asked."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def arrays_path(self) -> Path:
        return self.path / ARRAYS_DIR

    def exists(self) -> bool:
        # Anything named manifest.json (a symlink, a FIFO) makes a model folder, so reading it
        # says what is wrong with it instead of "no store here".
        return os.path.lexists(self.manifest_path)

    def manifest(self) -> Manifest:
        """One consistent snapshot: the manifest checkpoint with the commit log folded in, typed and bounded.

        Raises:
            StoreNotFound: no manifest.
            StoreError: a damaged or hostile manifest or commit record (one line).
        """
        return snapshot.read(self.path)[0]

    def has_clean_shard(self, manifest: Manifest | None = None) -> bool:
        """Whether at least one clean shard is committed: less than that is an incomplete ingest."""
        if manifest is None:
            if not self.exists():
                return False
            manifest = self.manifest()
        return any(e.phase == "clean" for e in manifest.shards.values())

    def remove_if_uncommitted(self) -> bool:
        """Delete this folder if no shard was ever committed to it (an ingest that failed early).

        Only call this on a folder the failing run created itself. Returns whether it was removed.
        """
        try:
            # The snapshot, not manifest.json alone: commits since the last checkpoint live in the log.
            if not self.path.is_dir() or (self.exists() and self.manifest().shards):
                return False
        except (OSError, ValueError, StoreError):  # unreadable: keep it for `verify` to report
            return False
        files.remove_tree(self.path)
        return True

    def shard_file(self, table: str, shard_id: str) -> Path:
        return self.path / "tables" / table / f"{shard_id}.parquet"

    def table_files(self, table: str, manifest: Manifest | None = None) -> list[Path]:
        """The committed Parquet files of one table, in shard order (paths checked inside the folder).

        Raises:
            StoreError: a listed file is a symlink, a FIFO or a device (a missing one is left to the reader).
        """
        manifest = manifest if manifest is not None else self.manifest()
        # Compacted files first: they hold the older shards' rows (see store/compact.py).
        out = [self.path / f.path for f in manifest.compacted.get(table, ())]
        for shard_id in sorted(manifest.shards):
            entry = manifest.shards[shard_id].files.get(table)
            if entry is not None:
                out.append(self.path / entry.path)
        derived = manifest.derived.get(table)
        if derived is not None:
            out.append(self.path / derived.path)
        return [files.check_regular(p, missing_ok=True) for p in out]

    def file_problem(self, entry: FileEntry) -> str | None:
        """Why a committed file entry no longer matches its file (missing, or another size), or None.

        One stat per file, cheap enough for every resume; `verify` also compares checksums.
        """
        path = self.path / entry.path
        problem = files.file_problem(path)  # a symlink or FIFO is damage too: the shard is redone
        if problem:
            return problem
        size = os.lstat(path).st_size
        return None if size == entry.bytes else f"has {size} bytes, not the {entry.bytes} committed"

    def damaged_shards(self, manifest: Manifest) -> dict[str, str]:
        """Committed shards with a file or Zarr chunk missing or resized: shard id -> what is wrong.

        Raises:
            StoreError: a compacted file is damaged (its rows belong to many shards; nothing to redo).
        """
        for table, lst in sorted(manifest.compacted.items()):
            for f in lst:
                problem = self.file_problem(f)
                if problem:
                    raise StoreError(f"{self.path}: compacted {table} file {f.path} {problem}; restore it, "
                                     "or re-ingest with --overwrite")
        out = {}
        for sid, e in sorted(manifest.shards.items()):
            problems = [f"{f.path} {p}" for f in e.files.values() if (p := self.file_problem(f))]
            problems += [f"{rel} {p}" for rel, digest in e.chunks.items()
                         if digest is not None and (p := files.file_problem(self.path / rel))]
            if problems:
                out[sid] = problems[0]
        return out

    def read_table(self, table: str, columns: list[str] | None = None) -> pa.Table | None:
        return files.read_parquet(self.table_files(table), columns)

    def write_shard_files(self, shard_id: str, tables: dict[str, pa.Table]) -> dict:
        """Write a shard's tables (validated against the schema). Returns their manifest entries."""
        entries = {}
        for name, table in tables.items():
            table = validate_table(TABLES[name], table)
            path = self.shard_file(name, shard_id)
            files.inside(self.path, str(path.relative_to(self.path)))  # no symlinked folder leads the write out
            size, digest = files.write_parquet(path, table)
            entries[name] = {
                "path": str(path.relative_to(self.path)),
                "rows": table.num_rows,
                "bytes": size,
                "sha256": digest,
            }
        return entries


def list_models(root: Path, incomplete: bool = False) -> list[ModelStore]:
    """Every model folder with a manifest under a store root (or the root itself if it is one).

    Args:
        root: a store root or one model folder.
        incomplete: also list folders without a manifest (left by an ingest that failed
            before writing it), so `verify` can report them.
    """
    root = Path(root)
    if not root.exists():
        raise StoreNotFound(f"no selfrepair store at {root}")
    if os.path.lexists(root / MANIFEST) or (incomplete and ((root / "tables").is_dir() or (root / ARRAYS_DIR).is_dir())):
        return [ModelStore(root)]
    keep = (lambda p: p.is_dir() and not p.name.startswith(".")) if incomplete else (lambda p: os.path.lexists(p / MANIFEST))
    models = sorted(ModelStore(p) for p in root.iterdir() if keep(p)) if root.is_dir() else []
    for ms in models:
        # A model folder linked in from elsewhere would be read (and written) outside the store
        # root: refused, like every other symlink in a store (README: "Symlinks").
        if ms.path.is_symlink():
            raise StoreError(f"model folder {ms.path} is a symlink (to {os.readlink(ms.path)}); a store's "
                             "model folders must lie inside its root: move the folder in, or use that store directly")
    if not models:
        raise StoreNotFound(f"no selfrepair store at {root} (no model folder with a {MANIFEST})")
    return models


ModelStore.__lt__ = lambda a, b: a.name < b.name  # sorted() over model folders


def is_model_folder(path: Path) -> bool:
    """Whether `path` looks like a model folder: a manifest, or what an ingest leaves before writing one."""
    return (path / MANIFEST).is_file() or (path / snapshot.LOG_DIR).is_dir() or (path / ARRAYS_DIR).is_dir()


def enclosing_model_folder(path: Path) -> Path | None:
    """The model folder that `path` (taken as a real path) is or lies in, or None: for refusing writes into a store."""
    for folder in (Path(path), *Path(path).parents):
        try:
            if is_model_folder(folder):
                return folder
        except OSError:  # an unreadable ancestor: nothing to learn from it
            continue
    return None
