"""Fault injection you can repeat: die by SIGKILL the n-th time execution reaches a named point.

Set `SELFREPAIR_FAULT=<point>[:<n>]` (n ≥ 1, default 1) and the process that reaches
`<point>` for the n-th time SIGKILLs itself there: no `finally`, no `atexit`, no flush, as
a power cut or the OOM killer would leave it. The kill is decided by counting, never by
timing, so a test replays the same crash every time. The variable is read once, at the
first `point()` call; `arm()` replaces it for a process (a forked test child). Unset, a
point costs one global lookup.

`SELFREPAIR_FAULT_ONCE=<path>` (optional) makes the kill happen once across processes:
only the process that creates `<path>` (O_EXCL) dies; the others, and a restarted Ray
worker, run on. Without it every process that reaches the point n times dies. An ingest
with `--executor ray` hands both variables to its workers (`ray_options`).

Points (where a kill leaves the store; the phase `<p>` of a shard is `clean`, `ablation`
or `neurons`, the derived table `<t>` is `vocab` or `head_top_tokens`):

| point | where |
|---|---|
| `writer.shard.<p>.written` | a shard's files are written (and fsynced), its commit record not yet appended |
| `writer.shard.<p>.appended` | its record is appended and fsynced (the log may be folded right after) |
| `writer.derived.<t>.written` | a derived table's new file is written, its record not yet appended |
| `writer.derived.<t>.appended` | its record is appended |
| `writer.set.appended` | a `set` record (token count, config, arrays) is appended |
| `writer.checkpoint.log_created` | a checkpoint's new empty log exists; the manifest still names the old one |
| `writer.checkpoint.renamed` | the new `manifest.json` is renamed into place; the old log is still there |
| `writer.checkpoint.done` | the old log is removed |
| `writer.orphan.removed` | one leftover file is removed by the start-up (or post-compaction) cleanup; use n=2 for mid-deletion |
| `compact.written` | every compacted file is written; the `compact` record not yet appended |
| `compact.committed` | the `compact` record is appended; the old shard files not yet deleted |
| `ray.worker.written` | a Ray worker has written a unit's files; the entry is not yet returned to the driver |

`tests/store/test_faults.py` kills each command (fresh ingest, extensions with more
tokens, heads or draws, `compact`, a Ray worker) at each point it reaches, reruns it,
and checks the store against a one-shot run.
"""

from __future__ import annotations

import os
import signal

from selfrepair.errors import ConfigError

ENV = "SELFREPAIR_FAULT"
ONCE_ENV = "SELFREPAIR_FAULT_ONCE"

_UNREAD = object()
_armed: object | tuple[str, int] | None = _UNREAD  # (point, n), None (no fault), or not read yet
_once: str | None = None
_hits = 0


def parse(spec: str | None) -> tuple[str, int] | None:
    """`point[:n]` as (point, n); None for an empty spec. A malformed spec raises ConfigError (one line)."""
    if not spec:
        return None
    name, sep, n = spec.rpartition(":")
    if not sep:
        name, n = spec, "1"
    if not name or not n.isascii() or not n.isdigit() or int(n) < 1:
        raise ConfigError(f"{ENV}: expected <point>[:<n>] with n >= 1, got {spec!r}")
    return name, int(n)


def arm(spec: str | None, once: str | None = None) -> None:
    """Replace the process's fault (a spec as in SELFREPAIR_FAULT; None disarms) and reset its count."""
    global _armed, _once, _hits
    _armed, _once, _hits = parse(spec), once, 0


def point(name: str) -> None:
    """A named commit point: SIGKILL this process if the armed fault names it and this is its n-th hit."""
    global _hits
    if _armed is None:
        return
    if _armed is _UNREAD:
        arm(os.environ.get(ENV), os.environ.get(ONCE_ENV))
        if _armed is None:
            return
    target, n = _armed
    if name != target:
        return
    _hits += 1
    if _hits == n and _claim():
        os.kill(os.getpid(), signal.SIGKILL)


def ray_options() -> dict:
    """Ray actor options that hand this process's fault variables to the workers (on any node)."""
    env = {k: os.environ[k] for k in (ENV, ONCE_ENV) if os.environ.get(k)}
    return {"runtime_env": {"env_vars": env}} if env else {}


def _claim() -> bool:
    if not _once:
        return True
    try:
        os.close(os.open(_once, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return True
    except FileExistsError:
        return False
