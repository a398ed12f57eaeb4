"""Writing one shard's files, in any process; the model folder's one Writer commits the entry.

This is the worker half of a commit: a distributed ingest's workers write their shards'
Parquet files (and a clean shard's Zarr region) into the model folder and hand back the
shard entry; only the driver, which holds the writer lock, appends it to the commit log
(`Writer.commit_written`). Until then no reader sees the files, and a start-up cleanup
of the next writer removes them if they are never committed.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from selfrepair.store import arrays, files
from selfrepair.store.model_store import ModelStore


def write_shard(ms: ModelStore, shard_id: str, entry: dict, tables: dict[str, pa.Table]) -> dict:
    """Write a shard's tables (temporary name, fsync, rename). Returns `entry` with its `files`.

    Args:
        ms: the model folder.
        shard_id: the shard's id (a new one from `store/plan.py`, never a committed one).
        entry: the shard entry without `files` (phase, rows, ablation, …).
        tables: table name -> rows.
    """
    return entry | {"files": ms.write_shard_files(shard_id, tables)}


def write_clean_shard(ms: ModelStore, shard_id: str, rows: tuple[int, int], tokens: tuple[int, int],
                      tables: dict[str, pa.Table], values: dict[str, np.ndarray]) -> dict:
    """A clean shard: its Zarr region (whole chunks, checksummed for `verify`), then its tables.

    The arrays must exist (`Writer.prepare_arrays`); a clean shard's region is whole
    chunks, so shards written by different processes never share a chunk file.

    Returns:
        The shard entry to commit.
    """
    chunks = {}
    for name, array in values.items():
        for p in arrays.region_chunks(ms.arrays_path, name, *tokens):  # checked before anything is written
            files.inside(ms.path, str(p.relative_to(ms.path)))
        arrays.write_region(ms.arrays_path, name, tokens[0], array)
        for p in arrays.region_chunks(ms.arrays_path, name, *tokens):
            chunks[str(p.relative_to(ms.path))] = files.sha256_file(p) if p.exists() else None
    entry = {"phase": "clean", "rows": list(rows), "tokens": list(tokens), "chunks": chunks}
    return write_shard(ms, shard_id, entry, tables)


def remove_leftovers(ms: ModelStore, shard_id: str) -> list:
    """Delete the temporary files a killed attempt at `shard_id` left (before the shard is redone).

    Completed files of the failed attempt need no removal: the retry replaces them by rename.
    """
    removed = []
    tables_dir = ms.path / "tables"
    if tables_dir.is_dir() and not tables_dir.is_symlink():
        for p in tables_dir.glob(f"*/.{shard_id}.parquet.*.tmp"):
            if files.remove_inside(ms.path, p):
                removed.append(p)
    return removed
