"""One consistent view of a model folder: the manifest checkpoint plus its commit log.

The writer appends one small record per commit to `commits/<generation>.jsonl` and, now
and then, folds the log into `manifest.json` under the next generation (a checkpoint).
A reader reads the manifest, then the log its generation names; if that log is gone,
a checkpoint happened in between, so it reads again. Everything read is parsed
into typed, bounded objects (`store/manifest.py`, `store/records.py`), read with a size limit
and without following symlinks (`store/jsonread.py`); every path must stay inside the model folder.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from selfrepair.errors import StoreError, StoreNotFound
from selfrepair.store import files, jsonread
from selfrepair.store.manifest import Manifest, parse_manifest
from selfrepair.store.records import Fold, Record, parse_record

MANIFEST_NAME = "manifest.json"
LOG_DIR = "commits"
_RETRIES = 50


def log_path(folder: Path, generation: int) -> Path:
    return folder / LOG_DIR / f"{generation:08d}.jsonl"


def _check_log_dir(folder: Path) -> None:
    # O_NOFOLLOW guards the log file itself; its folder must not lead out of the model folder either.
    try:
        st = os.lstat(folder / LOG_DIR)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{folder / LOG_DIR} is a symlink or not a folder; "
                         "a model folder's commits must lie inside it")


def read_log(folder: Path, generation: int,
             manifest: Manifest | None = None) -> tuple[list[Record], int, Manifest | None]:
    """The complete records of one log generation (a torn last line is not a record), bounded in size.

    Args:
        manifest: when given, each record is folded into it (and checked against it) in turn.

    Returns:
        (records, byte length of the complete part, the manifest with them folded in).

    Raises:
        FileNotFoundError: no log of that generation (a checkpoint replaced it).
    """
    _check_log_dir(folder)
    path = log_path(folder, generation)
    records, end = [], 0
    fold = Fold(folder, manifest) if manifest is not None else None
    log = f"commit log {path}"
    with jsonread.open_regular(path, log, jsonread.LOG_MAX_BYTES) as f:
        lines = jsonread.lines_bounded(f, log, jsonread.RECORD_MAX_BYTES, jsonread.LOG_MAX_BYTES)
        for i, line in enumerate(lines):
            what = f"commit record {i} of {path}"
            record = parse_record(folder, jsonread.parse_json(line, what), i, what)
            if fold is not None:
                fold.add(record, what)
            records.append(record)
            end += len(line)
    return records, end, fold.result() if fold is not None else None


def read(folder: Path) -> tuple[Manifest, int, int]:
    """One consistent snapshot of a model folder.

    Returns:
        (typed manifest with the log folded in, log generation, records in that log).

    Raises:
        StoreNotFound: no manifest.
        StoreError: a damaged or hostile manifest or commit record.
    """
    mpath = folder / MANIFEST_NAME
    files.forget_real_paths()  # folder real paths are cached within one read only
    for _ in range(_RETRIES):
        what = f"manifest {mpath}"
        try:
            data = jsonread.read_bounded(mpath, what, jsonread.MANIFEST_MAX_BYTES)
        except FileNotFoundError:
            raise StoreNotFound(f"no selfrepair store at {folder} (missing {MANIFEST_NAME})") from None
        manifest = parse_manifest(folder, jsonread.parse_json(data, what), what)
        if manifest.log is None:  # schema 1, or a store checkpointed with no log yet
            return manifest, -1, 0
        generation = manifest.log.generation
        try:
            records, _, manifest = read_log(folder, generation, manifest)
        except FileNotFoundError:
            continue  # a checkpoint replaced this generation between our two reads
        return manifest, generation, len(records)
    raise StoreError(f"{folder}: the commit log {log_path(folder, generation)} is missing")
