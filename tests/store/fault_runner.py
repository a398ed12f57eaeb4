"""A fork server for the fault-injection tests: torch, transformers and the tiny model loaded once.

`python fault_runner.py MODEL_DIR` saves the tiny GPT-2 there if it is missing, prints
`{"ready": true}`, then reads one JSON request per line on stdin and answers one JSON line
on stdout. Every command runs in a child forked from this process, so it starts in
milliseconds with the model already loaded, and dies alone when its fault fires.

A step is {"cmd": "ingest"|"compact"|"none", "root": PATH, "config": {...}, "fault": "point:n" |
"trace" | "new:<JSON list of points>" | null, "check": bool, "retry_busy": bool}; its result is {"rc": exit code (-9:
SIGKILLed), "trace": {point: hits} (fault "trace": points counted, none killed),
"killed_at": the point (fault "new:[…]": killed at the first point not listed),
"refusals": lock refusals retried, "check": the store's digest after the step}.

    {"jobs": [[item, ...], ...], "parallel": N}
        -> {"results": [{"results": [result, ...], "cpu": CPU seconds of the job's children}, ...]}

runs each job's items in order, up to N jobs at once. An item is a step (its result), or
{"race": [step, ...]}: all forked, then released together (their results), or
{"until_done": step}: the step run again and again, each run killed at the first point no
earlier run was killed at, until one finishes (every run's result).

The digest (`check`) is, per table, its row count, its number of duplicate keys (SQL
GROUP BY key HAVING count(*) > 1) and the SHA-256 of its rows sorted by key, plus whether
`verify` passes and the table files no entry lists (orphans): computed in the child, so checks run in parallel too.

This process itself never runs a command: Polars' thread pool (and torch's OpenMP one)
do not survive a fork, so they are first used in the children only; torch runs one
thread per process for the same reason.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import pkgutil
import select
import signal
import sys
import time
import traceback
from collections import Counter, deque
from pathlib import Path

import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models

import tiny_models  # noqa: E402
from tiny_models import ingest_tiny  # noqa: E402

from selfrepair.errors import SelfRepairError, StoreBusy  # noqa: E402
from selfrepair.ingest import models  # noqa: E402
from selfrepair.ingest.config import IngestConfig  # noqa: E402
from selfrepair.store import faults  # noqa: E402

KILLED = -9  # a child's exit code when SIGKILL ended it
RACE_SECONDS = 60  # a racing writer gives up after this long of refusals
CHILD_SECONDS = 300


def _prepare(model_dir: str) -> None:
    """Load the tiny model once here; every child's load_model returns it (copy-on-write after fork)."""
    if not Path(model_dir).exists():
        tiny_models.save("gpt2", Path(model_dir))
    load = models.load_model
    cache = {}

    def cached(*args):
        if args not in cache:
            cache[args] = load(*args)
        return cache[args]

    models.load_model = cached
    cfg = IngestConfig(model=model_dir)
    m = cached(cfg.model, cfg.device, cfg.revision)
    with torch.no_grad():  # the first forward pass's one-time costs, paid once
        m.hf_model(torch.zeros(1, 4, dtype=torch.long))
    import selfrepair.ingest
    import selfrepair.queries
    import selfrepair.store

    for pkg in (selfrepair.ingest, selfrepair.store, selfrepair.queries):  # imported here, not once per child
        for mod in pkgutil.iter_modules(pkg.__path__):
            if mod.name != "ray_pool":
                importlib.import_module(f"{pkg.__name__}.{mod.name}")


def _command(step: dict, model_dir: str) -> None:
    root = Path(step["root"])
    if step["cmd"] == "none":  # a digest alone
        return
    if step["cmd"] == "compact":
        from selfrepair.store.compact import compact

        compact(root)
    else:
        ingest_tiny(model_dir, root, **step["config"])


def _digest(root: Path) -> dict:
    from selfrepair import Store
    from selfrepair.store.schema import TABLES
    from selfrepair.store.verify import verify

    s = Store.open(root)
    dups = s.sql(" UNION ALL ".join(  # one query for every table's count of keys held by more than one row
        f"SELECT '{name}' AS t, count(*) AS n FROM (SELECT {', '.join(spec.key)} FROM {name} "
        f"GROUP BY {', '.join(spec.key)} HAVING count(*) > 1)" for name, spec in TABLES.items()))
    dup = dict(zip(dups["t"].to_list(), dups["n"].to_list()))
    tables = {}
    for name, spec in TABLES.items():
        rows = s.sql(f"SELECT * FROM {name} ORDER BY {', '.join(spec.key)}")
        buf = io.BytesIO()
        rows.write_ipc(buf)
        tables[name] = {"rows": rows.height, "duplicate_keys": int(dup[name]),
                        "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}
    report = verify(root)
    return {"tables": tables, "verify_ok": report.ok, "orphans": _orphans(root),
            "verify_problems": [p for ps in report.problems.values() for p in ps]}


def _orphans(root: Path) -> list[str]:
    """Table files no committed entry lists (left by a killed run until a writer's cleanup)."""
    from selfrepair.store.model_store import list_models

    out = []
    for ms in list_models(root):
        m = ms.manifest()
        listed = {e.path for s in m.shards.values() for e in s.files.values()}
        listed |= {e.path for e in m.derived.values()}
        listed |= {e.path for lst in m.compacted.values() for e in lst}
        out += sorted(str(p.relative_to(ms.path)) for p in (ms.path / "tables").rglob("*")
                      if p.is_file() and str(p.relative_to(ms.path)) not in listed)
    return out


def _child(step: dict, model_dir: str, out_fd: int, gate: tuple[int, int] | None = None) -> None:
    """The forked child: wait for the gate, arm the fault, run, check; report and exit without cleanup."""
    code, report = 0, {}
    signal.alarm(CHILD_SECONDS)  # a hung child (a deadlock after fork) ends with -14, not a hung test
    os.dup2(2, 1)  # stdout is the server's answer channel
    try:
        if gate is not None:
            os.close(gate[1])  # else this child's own copy keeps the gate shut
            os.read(gate[0], 1)
        hits: Counter = Counter()
        fault = step.get("fault") or ""
        if fault == "trace":
            faults.point = lambda name: hits.update([name])
        elif fault.startswith("new:"):
            faults.point = _kill_at_new(set(json.loads(fault[4:])), out_fd)
        else:
            faults.arm(step.get("fault"))
        refusals, start = 0, time.monotonic()
        while True:
            try:
                _command(step, model_dir)
                break
            except StoreBusy:
                if not step.get("retry_busy") or time.monotonic() - start > RACE_SECONDS:
                    raise
                refusals += 1
                time.sleep(0.25)  # a waiting writer polls: each try costs a few milliseconds
        report = {"refusals": refusals, "trace": dict(hits), "cpu_run": time.process_time()}
        if step.get("check"):
            faults.arm(None)
            report["check"] = _digest(Path(step["root"]))
            report["cpu_check"] = time.process_time() - report["cpu_run"]
    except SelfRepairError as e:
        print(f"Error: {e}", file=sys.stderr)
        code = 1
    except BaseException:  # noqa: BLE001 - a child must exit, whatever happened
        traceback.print_exc()
        code = 2
    os.write(out_fd, json.dumps(report).encode())
    os._exit(code)


def _kill_at_new(seen: set, out_fd: int):
    """A point that SIGKILLs at the first point not in `seen`, after reporting its name."""

    def point(name: str) -> None:
        if name not in seen:
            os.write(out_fd, json.dumps({"killed_at": name}).encode())
            os.kill(os.getpid(), signal.SIGKILL)

    return point


def _fork(step: dict, model_dir: str, gate: tuple[int, int] | None = None) -> tuple[int, int]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(step, model_dir, w, gate)
    os.close(w)
    return pid, r


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def _finish(pid: int, r: int) -> dict:
    report = json.loads(_read_all(r) or b"{}")
    _, status = os.waitpid(pid, 0)
    return {"rc": os.waitstatus_to_exitcode(status), **report}


def _race(steps: list, model_dir: str) -> list:
    """Fork every step, then release them together."""
    gate_r, gate_w = os.pipe()
    started = [_fork(step, model_dir, (gate_r, gate_w)) for step in steps]
    os.close(gate_r)
    os.close(gate_w)  # every child's read returns now: they start together
    return [_finish(pid, r) for pid, r in started]


def _until_done(step: dict, model_dir: str) -> list:
    """Run `step` again and again, each run killed at the first point no earlier run was killed at,
    until one finishes (or fails otherwise)."""
    seen: list[str] = []
    results = []
    while True:
        res = _finish(*_fork(step | {"fault": "new:" + json.dumps(seen)}, model_dir))
        results.append(res)
        if res["rc"] != KILLED or res.get("killed_at") in seen + [None]:
            return results
        seen.append(res["killed_at"])


def _item(item: dict, model_dir: str):
    if "race" in item:
        return _race(item["race"], model_dir)
    if "until_done" in item:
        return _until_done(item["until_done"], model_dir)
    return _finish(*_fork(item, model_dir))


def _job(items: list, model_dir: str) -> tuple[int, int]:
    """A process that runs one job's items in order (it never runs a command itself)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            results = [_item(item, model_dir) for item in items]
            t = os.times()  # every step's child is reaped: their CPU time is the job's cost
            os.write(w, json.dumps({"results": results, "cpu": t.children_user + t.children_system}).encode())
        finally:
            os._exit(0)
    os.close(w)
    return pid, r


def _jobs(jobs: list, model_dir: str, parallel: int) -> list:
    results: list = [None] * len(jobs)
    waiting = deque(enumerate(jobs))
    running: dict[int, tuple[int, int, list]] = {}  # read fd -> (job index, pid, bytes so far)
    while waiting or running:
        while waiting and len(running) < parallel:
            i, steps = waiting.popleft()
            pid, r = _job(steps, model_dir)
            running[r] = (i, pid, [])
        ready, _, _ = select.select(list(running), [], [])
        for r in ready:
            i, pid, chunks = running[r]
            chunk = os.read(r, 65536)
            if chunk:
                chunks.append(chunk)
                continue
            os.close(r)
            del running[r]
            os.waitpid(pid, 0)
            results[i] = json.loads(b"".join(chunks))
    return results  # each {"results": [...], "cpu": seconds}


def main(model_dir: str) -> None:
    _prepare(model_dir)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        answer = {"results": _jobs(req["jobs"], model_dir, max(1, int(req.get("parallel", 1))))}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
