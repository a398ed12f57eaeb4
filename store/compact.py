"""`selfrepair compact`: rewrite each table's many shard files into one large file sorted by its key.

An ingest writes one small file per table per shard (thousands at 1 M tokens), so opening
the store and scanning a head's rows cost per file. Compaction merges every compactable
shard's rows (and the previous compacted file) into one Parquet file per table and file
layout (a store written before units keeps its older files, by their own key), sorted by the
table's key (`ablation_effects` by ablation, sample, condition, unit, token_index) in row
groups of ROW_GROUP_ROWS, so DuckDB skips row groups by their min/max on condition and unit.
DuckDB does the sort out of core, so memory stays bounded whatever the store's size.

The swap is one commit record (`op: compact`, `store/schema.py`) appended under the
writer lock after every new file is written, fsynced and checksummed: a reader's snapshot
lists either the old shard files or the new compacted ones, never both, and a kill at any
moment leaves either the old snapshot (plus orphan files, removed by the next cleanup) or
the new one. The shards keep their entries — rows, ablation, draw, condition, units — with `files`
emptied and `compacted` naming the tables moved, so `store/plan.py` still sees every
stored (ablation, sample, condition, unit, batch) and `verify` still checks that no two
shards overlap. A partial batch (shorter than the ingest's batch size) is left out: an extension
with more tokens redoes it. When an extension redoes a compacted shard anyway (a full
batch whose resample pairs pointed into the grown last batch), `Writer.commit` swaps in,
in the same record, copies of the compacted files without that shard's units
(`store/compacted_files.py: without_shards`): rows are unique per unit, so dropping by unit is exact.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from selfrepair.store import faults
from selfrepair.store.compacted_files import by_layout, write_sorted
from selfrepair.store.manifest import Manifest
from selfrepair.store.model_store import list_models
from selfrepair.store.schema import TABLES
from selfrepair.store.writer import Writer


@dataclass
class Result:
    """What one model's compaction did."""

    model: str
    shards: int = 0
    files_before: int = 0
    files_after: int = 0
    rows: int = 0

    def line(self) -> str:
        if not self.shards:
            return f"{self.model}: nothing to compact"
        return (f"{self.model}: {self.shards} shards, {self.files_before} files -> {self.files_after} "
                f"sorted files ({self.rows:,} rows)")


def compactable(manifest: Manifest) -> list[str]:
    """Shards with files whose batch is complete (a partial last batch may still be redone)."""
    shards = manifest.shards
    full = manifest.batch_size
    if not full:  # stores written without the runner: the longest batch is a full one
        full = max((e.rows[1] - e.rows[0] for e in shards.values()), default=0)
    return sorted(sid for sid, e in shards.items() if e.files and e.rows[1] - e.rows[0] >= full)


def compact(root: Path) -> list[Result]:
    """Compact every model folder under a store root (each under its writer lock)."""
    out = []
    for ms in list_models(Path(root)):
        with Writer.open(ms) as writer:
            out.append(compact_with(writer))
    return out


def compact_with(writer: Writer) -> Result:
    """Compact one model folder through a writer that holds its lock (also called at the end of an ingest)."""
    ms, manifest = writer.ms, writer.manifest
    result = Result(ms.name)
    if manifest is None:
        return result
    ids = compactable(manifest)
    if not ids:
        writer.clean_orphans()  # what a compaction killed before its deletions were done left behind
        return result
    old = manifest.compacted
    sources: dict[str, list[Path]] = {t: [ms.path / f.path for f in old.get(t, ())] for t in TABLES}
    for sid in ids:
        for table, f in manifest.shards[sid].files.items():
            sources[table].append(ms.path / f.path)
            result.files_before += 1
    result.files_before += sum(len(v) for v in old.values())
    tag = uuid.uuid4().hex[:8]  # never the name of a listed file: old snapshots stay readable
    new: dict[str, list[dict]] = {}
    for table, paths in sources.items():
        if paths:  # one sorted file per layout (a store written before units keeps its older files as they are)
            new[table] = [write_sorted(ms, table, group, f"compact-{tag}" + (f"-{i}" if i else ""))
                          for i, group in enumerate(by_layout(paths).values())]
            result.rows += sum(f["rows"] for f in new[table])
    faults.point("compact.written")
    writer.commit_compaction(new, ids)
    faults.point("compact.committed")
    # Readers that opened the old snapshot must reopen: its files go now, not at the next ingest.
    writer.clean_orphans()
    result.shards, result.files_after = len(ids), sum(len(v) for v in new.values())
    return result
