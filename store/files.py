"""All file access of the store goes through here (pyarrow filesystem + atomic renames).

Keeping every read and write in one module means an object-store root can be added
later by swapping the filesystem, without touching ingest, queries or analysis.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import stat
import tempfile
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from selfrepair.errors import StoreError

PARQUET_COMPRESSION = "zstd"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def raise_store_error(path: Path, e: OSError) -> None:
    """An OSError while writing `path`, re-raised as one StoreError line (out of space, not writable, …)."""
    if e.errno == errno.ENOSPC:
        raise StoreError(f"out of disk space while writing {path}") from None
    if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        raise StoreError(f"store path {path} is not writable") from None
    raise StoreError(f"cannot write {path}: {e.strerror or e}") from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename into place: readers see old or new, never half."""
    tmp = _tmp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise_store_error(path, e)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path):
    with open(path, "rb") as f:
        return json.loads(f.read())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_parquet(path: Path, table: pa.Table) -> tuple[int, str]:
    """Write one Parquet file atomically.

    Returns:
        (bytes on disk, sha256 of the file).
    """
    return write_file_with(path, lambda tmp: pq.write_table(
        table, tmp, compression=PARQUET_COMPRESSION, compression_level=6, use_dictionary=True,
        write_statistics=True,
    ))


def write_file_with(path: Path, write) -> tuple[int, str]:
    """Let `write(tmp_path)` produce a file (e.g. DuckDB's COPY), then fsync, checksum and rename it into place.

    Returns:
        (bytes on disk, sha256 of the file).
    """
    tmp = _tmp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        return size, digest
    except OSError as e:
        raise_store_error(path, e)
    finally:
        tmp.unlink(missing_ok=True)


def read_parquet(paths: list[Path], columns: list[str] | None = None) -> pa.Table:
    if not paths:
        return None
    return pa.concat_tables(pq.read_table(p, columns=columns) for p in paths)


def glob_literal(path: str | Path) -> str:
    """A path as a DuckDB glob pattern that matches only itself: `?`, `*` and `[` inside brackets.

    DuckDB expands every file name given to `read_parquet`, even in a list, so a model
    folder `a?` would also read its neighbour `ab`. (Polars: pass `glob=False`.)
    """
    return str(path).replace("[", "[[]").replace("?", "[?]").replace("*", "[*]")


def check_writable_dir(path: Path) -> None:
    """Refuse a file, or a folder (or its nearest existing parent) we cannot write, leaving no trace.

    Writability is probed by making and removing a folder: permission bits say nothing
    for root, and read-only mounts answer only to a real write.
    """
    if path.exists() and not path.is_dir():
        raise StoreError(f"store path {path} is a file, not a folder")
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise StoreError(f"store path {path} is below a file ({probe})")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".selfrepair-probe-", dir=probe))
    except OSError:
        raise StoreError(f"store path {path} is not writable") from None


def ensure_writable_dir(path: Path) -> None:
    """Create `path` if needed; refuse a file or an unwritable folder with one clear line."""
    check_writable_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise_store_error(path, e)
    if not os.access(path, os.W_OK | os.X_OK):
        raise StoreError(f"store path {path} is not writable")


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def remove_file(path: Path) -> None:
    path.unlink(missing_ok=True)


def check_name(root: Path, rel: str) -> None:
    """Refuse a manifest path that is not a plain relative name inside `root` (no `..`, not absolute)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise StoreError(f"{root}: a manifest path is empty or not a string ({rel!r})")
    if rel.startswith("/") or ".." in rel.split("/"):
        raise StoreError(f"{root}: manifest path {rel!r} leads outside the model folder")


def inside(root: Path, rel: str, follow: bool = True) -> Path:
    """`root / rel`, refused unless it stays inside `root` (no `..`, no absolute path, no symlink out).

    A store from someone else names its own files; this is what keeps such a name from
    reaching /etc/passwd through DuckDB's allow-list or an ingest's cleanup. Folder
    real paths are cached, so checking a snapshot's thousands of paths costs one lstat
    per file.
    """
    check_name(root, rel)
    full = os.path.join(root, rel)
    if follow:  # `follow=False`: names only, for paths that are checked again before use
        real_root = _realdir(str(root))
        parent, name = os.path.split(full)
        real = os.path.join(_realdir(parent), name)
        if os.path.islink(real):
            real = os.path.realpath(real)
        if not real.startswith(real_root + os.sep):
            raise StoreError(f"{root}: manifest path {rel!r} leads outside the model folder (through a symlink)")
    return Path(full)


@functools.lru_cache(maxsize=4096)
def _realdir_cached(path: str, _generation: int) -> str:
    return os.path.realpath(path)


_REALDIR_GENERATION = [0]


def _realdir(path: str) -> str:
    return _realdir_cached(path, _REALDIR_GENERATION[0])


def forget_real_paths() -> None:
    """Drop the cached folder real paths (after folders may have been replaced by symlinks)."""
    _REALDIR_GENERATION[0] += 1


def remove_inside(root: Path, path: Path) -> bool:
    """Delete one file (or symlink) only if its folder provably lies inside `root`; never a folder.

    Returns:
        Whether it was removed.
    """
    real_root = os.path.realpath(root)
    parent = os.path.realpath(path.parent)
    if parent != real_root and not parent.startswith(real_root + os.sep):
        return False
    if path.is_dir() and not path.is_symlink():
        return False
    path.unlink(missing_ok=True)
    return True


def file_problem(path: Path) -> str | None:
    """Why `path` is not a regular file the store may read, or None (one lstat; nothing is opened).

    A symlink is refused wherever it points (even inside: a shard is a file of its own
    folder, and a link could be re-aimed outside between a check and a read); a FIFO or
    device is refused because opening it would block or read without end.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "is missing"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if stat.S_ISLNK(mode):
        return "is a symlink (a store's files must lie inside it)"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a FIFO, socket or device)"
    return None


def open_regular(path: Path, flags: int, what: str = "", mode: int = 0o644, name: str | None = None) -> int:
    """`os.open` of a file the store owns, never through a symlink, never blocking on a FIFO.

    O_NOFOLLOW: a symlink in its place (dangling or not) is refused, so nothing outside is
    truncated, written or created through it. O_NONBLOCK, then fstat: a FIFO or device is
    refused at once (the descriptor is made blocking again for a regular file).

    Args:
        path: the file.
        flags: os.O_* flags (O_NOFOLLOW, O_NONBLOCK, O_NOCTTY and O_CLOEXEC are added).
        what: how the message names the file (e.g. "the writer lock"), default "file".
        name: the whole name for messages, path included (instead of `what` and the path).

    Raises:
        FileNotFoundError: no such file, when `flags` do not create it (the caller decides what that means).
        StoreError: a symlink, anything but a regular file, or an open that fails (one line).
    """
    name = name or f"{what or 'file'} {path}"
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, mode)
    except FileNotFoundError:
        if flags & os.O_CREAT:
            raise StoreError(f"cannot create the {name}: its folder is missing") from None
        raise
    except OSError as e:
        if os.path.islink(path):
            raise StoreError(f"the {name} is a symlink; it must be a regular file inside the model folder "
                             "(remove the link)") from None
        raise StoreError(f"cannot open the {name}: {e.strerror or e}") from None
    kind = os.fstat(fd).st_mode
    if not stat.S_ISREG(kind):
        os.close(fd)
        raise StoreError(f"the {name} is not a regular file ({_kind(kind)}); remove it")
    os.set_blocking(fd, True)
    return fd


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path: Path, missing_ok: bool = False) -> Path:
    """`path`, refused with one StoreError line unless it is a regular file (see `file_problem`)."""
    problem = file_problem(path)
    if problem and not (missing_ok and problem == "is missing"):
        raise StoreError(f"{path} {problem}")
    return path


def append_line(fd: int, path: Path, line: bytes) -> None:
    """Append one record to an open log (`path`, for messages) and fsync: durable on return."""
    try:
        os.write(fd, line)
        os.fsync(fd)
    except OSError as e:
        raise_store_error(path, e)


def free_disk(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under `path` (0 when it does not exist), never following symlinks."""
    total = 0
    for folder, _, names in os.walk(path, followlinks=False):
        for name in names:
            p = Path(folder) / name
            try:
                st = os.lstat(p)
            except FileNotFoundError:  # a temporary file renamed or removed while we walk
                continue
            if not os.path.islink(p):
                total += st.st_size
    return total
