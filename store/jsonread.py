"""Bounded reads of a model folder's JSON metadata: the manifest checkpoint and the commit log.

A store from someone else is input like any other: its manifest could be a FIFO, a link to
/dev/zero, 300 MB of one line or 100,000 nested brackets. Each file is opened without
following a symlink and without blocking, must be a regular file, and is read up to a stated
byte limit; JSON nesting is limited (the parser's own RecursionError is caught, and what it returns is
measured), so each case is one `StoreError` line and memory stays flat.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from selfrepair.errors import StoreError
from selfrepair.store import files

MIB = 1 << 20
# A shard entry is about 1.5 KB (store/estimate.py); a 1M-token store has a few thousand shards
# (a few MB of manifest). 256 MiB leaves room for ~150,000 shards and still bounds memory.
MANIFEST_MAX_BYTES = 256 * MIB
# One record holds one shard entry, a `set` of a few manifest keys, or a compaction that names
# every compacted file and shard: tens of KB at a few thousand shards.
RECORD_MAX_BYTES = 16 * MIB
# A log is folded into the manifest once it holds as many records as the manifest has shards.
LOG_MAX_BYTES = 2 * MANIFEST_MAX_BYTES
# A manifest is at most 6 levels deep (manifest > shards > entry > files > table > entry).
MAX_DEPTH = 32


def open_regular(path: Path, what: str, limit: int):
    """Open `path` for reading: no symlink, no FIFO or device (`files.open_regular`), at most `limit` bytes.

    Returns:
        A binary file object (the caller closes it).

    Raises:
        FileNotFoundError: no such file (callers decide what a missing file means).
        StoreError: a symlink, not a regular file, over the limit, or unreadable.
    """
    fd = files.open_regular(path, os.O_RDONLY, name=what)
    size = os.fstat(fd).st_size
    if size > limit:
        os.close(fd)
        raise StoreError(f"{what} has {size} bytes, over the limit of {limit}")
    return os.fdopen(fd, "rb")


def read_bounded(path: Path, what: str, limit: int) -> bytes:
    """All bytes of a regular file of at most `limit` bytes (it may grow while read: still bounded)."""
    with open_regular(path, what, limit) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise StoreError(f"{what} has more than {limit} bytes, over the limit")
    return data


def lines_bounded(f, what: str, limit: int, total: int) -> Iterator[bytes]:
    """The complete (newline-terminated) lines of `f`, each at most `limit` bytes, `total` in all.

    A last line without its newline (torn by a crash mid-append) is not yielded.
    """
    seen = 0
    while True:
        line = f.readline(limit + 1)
        seen += len(line)
        if seen > total:
            raise StoreError(f"{what} has more than {total} bytes, over the limit")
        if not line.endswith(b"\n"):
            if len(line) > limit:
                raise StoreError(f"{what}: a record has more than {limit} bytes, over the limit")
            return
        yield line


def nesting_depth(obj) -> int:
    """How deeply JSON objects and lists nest in `obj` (a scalar: 0), measured without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = node.values()
        elif not isinstance(node, list):
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in node if isinstance(child, (dict, list)))
    return deepest


def parse_json(data: bytes, what: str):
    """JSON text to Python objects, refusing damaged text and nesting beyond MAX_DEPTH (one line)."""
    too_deep = f"{what} nests JSON more than {MAX_DEPTH} levels deep, over the limit"
    try:
        # The C parser counts its own nesting and raises RecursionError (no crash) near
        # the interpreter's recursion limit; what it returns is measured below.
        obj = json.loads(data)
    except RecursionError:
        raise StoreError(too_deep) from None
    except (UnicodeDecodeError, ValueError):
        kind = "empty" if not data.strip() else "not valid JSON (truncated or binary?)"
        raise StoreError(f"{what} is {kind}") from None
    if nesting_depth(obj) > MAX_DEPTH:
        raise StoreError(too_deep)
    return obj
