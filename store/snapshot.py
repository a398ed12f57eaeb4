"""One consistent view of a model folder: the manifest checkpoint plus its commit log.

The writer appends one small record per commit to `commits/<generation>.jsonl` and, now
and then, folds the log into `manifest.json` under the next generation (a checkpoint).
A reader reads the manifest, then the log its generation names; if that log is gone,
a checkpoint happened in between, so it reads again. Everything read is validated
against `store/schema.py` and every path must stay inside the model folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from selfrepair.errors import StoreError, StoreNotFound
from selfrepair.store import files
from selfrepair.store.schema import (
    FILE_ENTRY, MANIFEST, MANIFEST_OPTIONAL, MODEL_FACTS, READABLE_SCHEMA_VERSIONS, RECORD, RECORD_OPS,
    SET_FORBIDDEN, SHARD_ENTRY, SHARD_ENTRY_OPTIONAL, TABLES,
)

MANIFEST_NAME = "manifest.json"
LOG_DIR = "commits"
_RETRIES = 50


def log_path(folder: Path, generation: int) -> Path:
    return folder / LOG_DIR / f"{generation:08d}.jsonl"


def _type_ok(value, want) -> bool:
    # bool is an int to Python; JSON true is never a count or an index here.
    if isinstance(value, bool):
        return want is bool
    return isinstance(value, want)


def _check_keys(obj, required: dict, optional: dict, what: str) -> None:
    if not isinstance(obj, dict):
        raise StoreError(f"{what} is a JSON {type(obj).__name__}, not an object")
    for key, want in required.items():
        if key not in obj:
            raise StoreError(f"{what} lacks the key {key!r}")
        if not _type_ok(obj[key], want):
            raise StoreError(f"{what}: {key!r} has the wrong type ({type(obj[key]).__name__})")
    for key, want in optional.items():
        if key in obj and obj[key] is not None and not _type_ok(obj[key], want):
            raise StoreError(f"{what}: {key!r} has the wrong type ({type(obj[key]).__name__})")


def check_shard_entry(folder: Path, shard_id, entry, what: str) -> None:
    """A shard entry's keys, types and paths (every path inside `folder`)."""
    if not isinstance(shard_id, str) or not shard_id:
        raise StoreError(f"{what}: a shard id is not a string")
    _check_keys(entry, SHARD_ENTRY, SHARD_ENTRY_OPTIONAL, f"{what}, shard {shard_id}")
    rows = entry["rows"]
    if len(rows) != 2 or not all(_type_ok(r, int) for r in rows) or not 0 <= rows[0] < rows[1]:
        raise StoreError(f"{what}, shard {shard_id}: rows {rows!r} is not a range")
    for table, f in entry["files"].items():
        if table not in TABLES:
            raise StoreError(f"{what}, shard {shard_id}: unknown table {table!r}")
        check_file_entry(folder, f, f"{what}, shard {shard_id}, table {table}")
    for rel, digest in (entry.get("chunks") or {}).items():
        files.check_name(folder, rel)  # only verify opens chunk files, and checks them fully (`inside`) first
        if digest is not None and not isinstance(digest, str):
            raise StoreError(f"{what}, shard {shard_id}: chunk {rel} has no valid checksum")


def check_file_entry(folder: Path, f, what: str) -> None:
    _check_keys(f, FILE_ENTRY, {}, what)
    files.inside(folder, f["path"])


def check_manifest(folder: Path, manifest, what: str) -> None:
    """Refuse a manifest that is not the shape `store/schema.py` gives, with one line."""
    _check_keys(manifest, MANIFEST, MANIFEST_OPTIONAL, what)
    version = manifest["schema_version"]
    if version not in READABLE_SCHEMA_VERSIONS:
        raise StoreError(f"{what}: schema_version {version} is not one this selfrepair reads "
                         f"({', '.join(map(str, READABLE_SCHEMA_VERSIONS))}); upgrade selfrepair")
    _check_keys(manifest["model"], MODEL_FACTS, {}, f"{what}, model")
    for shard_id, entry in manifest["shards"].items():
        check_shard_entry(folder, shard_id, entry, what)
    for table, entry in (manifest.get("derived") or {}).items():
        if table not in TABLES:
            raise StoreError(f"{what}: unknown derived table {table!r}")
        check_file_entry(folder, entry, f"{what}, derived {table}")
    check_compacted(folder, manifest.get("compacted") or {}, what)
    log = manifest.get("log")
    if log is not None and not (_type_ok(log.get("generation"), int) and log["generation"] >= 0):
        raise StoreError(f"{what}: log generation is missing or not a count")


def check_compacted(folder: Path, compacted, what: str) -> None:
    """The compacted files of each table: a list of file entries, every path inside `folder`."""
    if not isinstance(compacted, dict):
        raise StoreError(f"{what}: compacted is not an object")
    for table, entries in compacted.items():
        if table not in TABLES or not isinstance(entries, list):
            raise StoreError(f"{what}: compacted table {table!r} is unknown or not a list")
        for f in entries:
            check_file_entry(folder, f, f"{what}, compacted {table}")


def check_record(folder: Path, record, seq: int, what: str) -> None:
    _check_keys(record, RECORD, {}, what)
    if record["seq"] != seq:
        raise StoreError(f"{what}: seq {record['seq']} where {seq} was expected")
    op = RECORD_OPS.get(record["op"])
    if op is None:
        raise StoreError(f"{what}: unknown op {record['op']!r}")
    _check_keys(record, RECORD | op, {}, what)
    if record["op"] == "shard":
        check_shard_entry(folder, record["id"], record["entry"], what)
        if not all(isinstance(s, str) for s in record["supersedes"]):
            raise StoreError(f"{what}: supersedes names a non-string shard")
        if "compacted" in record:
            check_compacted(folder, record["compacted"], what)
    elif record["op"] == "derived":
        if record["table"] not in TABLES:
            raise StoreError(f"{what}: unknown derived table {record['table']!r}")
        check_file_entry(folder, record["entry"], what)
    elif record["op"] == "compact":
        check_compacted(folder, record["files"], what)
        if not all(isinstance(s, str) for s in record["shards"]):
            raise StoreError(f"{what}: compact names a non-string shard")
    elif any(k in SET_FORBIDDEN for k in record["values"]):
        raise StoreError(f"{what}: a set record may not replace {', '.join(SET_FORBIDDEN)}")


def apply(manifest: dict, record: dict) -> None:
    """Fold one validated record into a manifest (in place)."""
    op = record["op"]
    if op == "shard":
        for old in record["supersedes"]:
            manifest["shards"].pop(old, None)
        manifest["shards"][record["id"]] = record["entry"]
        if "compacted" in record:
            manifest["compacted"] = record["compacted"]
    elif op == "derived":
        manifest.setdefault("derived", {})[record["table"]] = record["entry"]
    elif op == "compact":
        manifest["compacted"] = record["files"]
        for sid in record["shards"]:
            entry = manifest["shards"].get(sid)
            if entry is not None:
                entry["compacted"] = sorted(set(entry.get("compacted", [])) | set(entry["files"]))
                entry["files"] = {}
    else:
        manifest.update(record["values"])


def parse_json(data: bytes, what: str):
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError):
        kind = "empty" if not data.strip() else "not valid JSON (truncated or binary?)"
        raise StoreError(f"{what} is {kind}") from None


def read_log(folder: Path, generation: int) -> tuple[list[dict], int]:
    """The complete records of one log generation (a torn last line is not a record).

    Returns:
        (records, byte length of the complete part).

    Raises:
        FileNotFoundError: no log of that generation (a checkpoint replaced it).
    """
    path = log_path(folder, generation)
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1  # a crash mid-append leaves a line without its newline
    records = []
    for i, line in enumerate(data[:end].split(b"\n")[:-1]):
        what = f"commit record {i} of {path}"
        record = parse_json(line, what)
        check_record(folder, record, i, what)
        records.append(record)
    return records, end


def read(folder: Path) -> tuple[dict, int, int]:
    """One consistent snapshot of a model folder.

    Returns:
        (manifest with the log folded in, log generation, records in that log).

    Raises:
        StoreNotFound: no manifest.
        StoreError: a damaged or hostile manifest or commit record.
    """
    mpath = folder / MANIFEST_NAME
    files.forget_real_paths()  # folder real paths are cached within one read only
    for _ in range(_RETRIES):
        try:
            data = mpath.read_bytes()
        except FileNotFoundError:
            raise StoreNotFound(f"no selfrepair store at {folder} (missing {MANIFEST_NAME})") from None
        except OSError as e:
            raise StoreError(f"cannot read {mpath}: {e.strerror or e}") from None
        manifest = parse_json(data, f"manifest {mpath}")
        check_manifest(folder, manifest, f"manifest {mpath}")
        manifest.setdefault("derived", {})
        log = manifest.get("log")
        if log is None:  # schema 1, or a store checkpointed with no log yet
            return manifest, -1, 0
        try:
            records, _ = read_log(folder, log["generation"])
        except FileNotFoundError:
            continue  # a checkpoint replaced this generation between our two reads
        for record in records:
            apply(manifest, record)
        return manifest, log["generation"], len(records)
    raise StoreError(f"{folder}: the commit log {log_path(folder, log['generation'])} is missing")
