"""One writer per model folder: an exclusive `flock` on `.writer.lock`, held for a whole ingest.

The kernel drops a flock when its process dies, however it dies, so a lock left by a
killed ingest is simply free again; the holder record it left (pid, host, start time)
is overwritten by the next writer. The lock file itself is never deleted (not even by
--overwrite): deleting it would let a second process lock a fresh file beside the
first one's.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from selfrepair.errors import StoreBusy
from selfrepair.store import files

LOCK_NAME = ".writer.lock"


class WriterLock:
    """The exclusive writer lock of one model folder (which must exist).

    Args:
        folder: the model folder.
    """

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None
        self.stale_holder: dict | None = None  # what a killed previous writer left behind

    def acquire(self) -> "WriterLock":
        """Take the lock or raise StoreBusy naming the holder; never waits."""
        # Never through a symlink or into a FIFO: the record written below would truncate or
        # create a file outside the store, or block. No O_TRUNC: the holder's record is read first.
        fd = files.open_regular(self.path, os.O_RDWR | os.O_CREAT, "writer lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(_read(fd))
            os.close(fd)
            raise StoreBusy(f"{self.path.parent} is being written by {holder}; "
                            "wait for that ingest to finish (or stop it) and run again") from None
        self.stale_holder = _parse(_read(fd))
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Clear the holder record and unlock (the file stays, empty)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> bytes:
    return os.pread(fd, 4096, 0)


def _parse(data: bytes) -> dict | None:
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _holder_text(data: bytes) -> str:
    holder = _parse(data)
    if not holder:
        return "another process (it has not recorded itself yet)"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
