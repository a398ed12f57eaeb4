"""Sorted, compacted Parquet files: writing them, and copies of them without some shards' units.

`selfrepair compact` (store/compact.py) writes each table's rows into one file sorted by its
key (one file per layout: files written before a schema change keep their columns and key);
when an extension redoes a compacted shard, `Writer.commit` swaps in, in the same
record, copies of the compacted files without that shard's units (`without_shards`): rows
are unique per unit, so dropping by unit is exact. Both live here, below the writer and
compaction, so neither imports the other to reach them.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from selfrepair.errors import StoreError
from selfrepair.store import files
from selfrepair.store.manifest import Manifest, ShardEntry
from selfrepair.store.model_store import ModelStore
from selfrepair.store.plan import NEURON_PHASE
from selfrepair.store.schema import TABLES, file_key

ROW_GROUP_ROWS = 131_072  # ~8 row groups per head at 1 M tokens: fine-grained min/max skipping
MEMORY_LIMIT = "1GB"  # DuckDB spills the sort to disk beyond this


def without_shards(ms: ModelStore, manifest: Manifest, shard_ids) -> dict[str, list[dict]]:
    """The compacted set of `manifest` with every row of the given (compacted) shards' units dropped, as new files."""
    preds = manifest.seq_len - 1
    drop: dict[str, list[ShardEntry]] = {}
    shards = [manifest.shards[sid] for sid in shard_ids if sid in manifest.shards]
    top = top_sets(ms, manifest) if any(e.phase == NEURON_PHASE for e in shards) else None
    for e in shards:
        for table in e.compacted:
            drop.setdefault(table, []).append(e)
    tag = uuid.uuid4().hex[:8]
    out = {}
    for table, entries in manifest.compacted.items():
        if table not in drop:
            out[table] = [dict(f.raw) for f in entries]
            continue
        out[table] = []
        for i, (names, paths) in enumerate(by_layout([ms.path / f.path for f in entries]).items()):
            terms = [_unit_condition(TABLES[table], names, e, preds, manifest, top) for e in drop[table]]
            where = "NOT (" + " OR ".join(terms) + ")"
            entry = write_sorted(ms, table, paths, f"compact-{tag}" + (f"-{i}" if i else ""), where)
            if entry["rows"]:  # a layout with no row left (every older row redone) leaves no file
                out[table].append(entry)
    return out


def by_layout(paths: list[Path]) -> dict[tuple[str, ...], list[Path]]:
    """Files by their columns (a store written before a schema change holds files of an older layout)."""
    out: dict[tuple[str, ...], list[Path]] = {}
    for p in paths:
        files.check_regular(p)  # a symlink (read out of the store) or a FIFO (blocks DuckDB) is refused
        out.setdefault(tuple(pq.read_schema(p).names), []).append(p)
    return out


def _unit_condition(spec, names, entry: ShardEntry, preds: int, manifest: Manifest, top: dict | None = None) -> str:
    """SQL that is true exactly on a shard's rows of one table, in files with columns `names` (from its unit:
    rows, draw, condition and units; a file written before units keys heads by (layer, head))."""
    n_layers, n_heads = manifest.model.n_layers, manifest.model.n_heads
    r0, r1 = entry.rows
    cols = set(names)
    terms = []
    if "token_index" in cols:
        if preds <= 0:
            raise StoreError("the manifest has no seq_len: cannot locate a compacted shard's rows")
        terms.append(f"token_index >= {r0 * preds} AND token_index < {r1 * preds}")
    elif "row" in cols:
        terms.append(f"row >= {r0} AND row < {r1}")
    if entry.phase in ("ablation", NEURON_PHASE):
        if "ablation" in cols:
            terms.append(f"ablation = {_literal(entry.ablation)}")
        if "sample" in cols:
            terms.append(f"sample = {entry.sample}")
        units = entry.unit_list(n_layers, n_heads)
        cond = entry.condition_label(n_layers, n_heads)
        if "condition" in cols:
            terms.append(f"condition = {_literal(cond)}")
        if "unit" in cols:
            terms.append("unit IN (" + ", ".join(_literal(u.label) for u in units) + ")")
        elif "head" in cols:  # a file written before units holds unconditioned head units only
            pairs = [(u.layer, u.head) for u in units if u.kind == "head" and not cond]
            terms.append("(layer, head) IN (" + ", ".join(f"({la}, {h})" for la, h in pairs) + ")" if pairs
                         else "false")
    if entry.phase == NEURON_PHASE and top is not None:
        # Its batch's ablation shards hold the detail of the heads' top-p% tokens in the same
        # tables, and they stay: only the other (extra) tokens are this shard's rows.
        r0t, r1t = r0 * preds, r1 * preds
        keep = []
        for u in entry.unit_list(n_layers, n_heads):
            toks = [t for t in top.get((u.layer, u.head), []) if r0t <= t < r1t]
            if toks:
                keep.append(f"(layer = {u.layer} AND head = {u.head} AND token_index IN ({', '.join(map(str, toks))}))")
        if keep:
            terms.append("NOT (" + " OR ".join(keep) + ")")
    return "(" + " AND ".join(terms) + ")"


def top_sets(ms: ModelStore, manifest: Manifest) -> dict | None:
    """Each head's top-p% tokens as the store's `head_top_tokens` holds them now (None: not stored)."""
    entry = manifest.derived.get("head_top_tokens")
    if entry is None:
        return None
    t = pq.read_table(files.check_regular(ms.path / entry.path), columns=["layer", "head", "token_index"])
    out: dict = {}
    for la, h, tok in zip(*(t.column(c).to_pylist() for c in ("layer", "head", "token_index"))):
        out.setdefault((la, h), []).append(tok)
    return out


def write_sorted(ms: ModelStore, table: str, paths: list[Path], name: str, where: str = "true") -> dict:
    """One table's rows from `paths` (those where `where` holds), sorted by its key, into `tables/<table>/<name>.parquet`."""
    spec = TABLES[table]
    path = ms.shard_file(table, name)
    layouts = by_layout(paths)
    if len(layouts) != 1:
        raise StoreError(f"table {table}: cannot compact files of {len(layouts)} layouts into one")
    (names,) = layouts
    listing = "[" + ", ".join(_literal(files.glob_literal(p)) for p in paths) + "]"  # literal paths, not patterns
    reader = f"read_parquet({listing})"
    # A file of an older layout (store/schema.py LEGACY_COLUMNS) stays one: rewritten as it is, by its own key.
    cols = ", ".join(names)
    order = ", ".join(file_key(spec, names))

    def write(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="selfrepair-compact-") as spill:
            con = duckdb.connect(":memory:", config={"memory_limit": MEMORY_LIMIT, "temp_directory": spill,
                                                     "preserve_insertion_order": True})
            try:
                con.execute(f"COPY (SELECT {cols} FROM {reader} WHERE {where} ORDER BY {order}) "
                            f"TO {_literal(str(tmp))} (FORMAT parquet, COMPRESSION zstd, "
                            f"ROW_GROUP_SIZE {ROW_GROUP_ROWS})")
            finally:
                con.close()

    size, digest = files.write_file_with(path, write)
    rows = pq.read_metadata(path).num_rows
    return {"path": str(path.relative_to(ms.path)), "rows": rows, "bytes": size, "sha256": digest}


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
