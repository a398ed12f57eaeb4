"""A fork server for the fault-injection tests: torch, transformers and the tiny model loaded once.

`python fault_runner.py MODEL_DIR` reads one JSON request per line on stdin and answers one
JSON line on stdout. Each command runs in a child forked from this process, so it starts
in milliseconds with the model already loaded, and dies alone when its fault fires:

    {"run": {"cmd": "ingest"|"compact", "root": PATH, "config": {...}, "fault": "point:n"|null}}
        -> {"rc": exit code, -9 when SIGKILLed, "trace": {point: hits}}
    {"race": [run, run, ...]}   all forked, released together; a writer refused by the
        lock (StoreBusy) retries until it gets it
        -> {"rcs": [...], "refusals": [...]}

This process itself never runs a command: Polars' thread pool (and torch's OpenMP one)
do not survive a fork, so they are first used in the children only. torch runs one
thread per process for the same reason.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models

from tiny_models import ingest_tiny  # noqa: E402

from selfrepair.errors import SelfRepairError, StoreBusy  # noqa: E402
from selfrepair.ingest import models  # noqa: E402
from selfrepair.ingest.config import IngestConfig  # noqa: E402
from selfrepair.store import faults  # noqa: E402
from selfrepair.store.compact import compact  # noqa: E402

RACE_SECONDS = 60  # a racing writer gives up after this long of refusals


def _cache_loader(model_dir: str) -> None:
    """Load the tiny model once here; every child's load_model returns it (copy-on-write after fork)."""
    load = models.load_model
    cache = {}

    def cached(*args):
        if args not in cache:
            cache[args] = load(*args)
        return cache[args]

    models.load_model = cached
    cfg = IngestConfig(model=model_dir)
    m = cached(cfg.model, cfg.device, cfg.dtype, cfg.revision)
    with torch.no_grad():  # the first forward pass's one-time costs, paid once
        m.hf_model(torch.zeros(1, 4, dtype=torch.long))
    import selfrepair.ingest
    import selfrepair.store

    for pkg in (selfrepair.ingest, selfrepair.store):  # imported here, not once per child
        for mod in pkgutil.iter_modules(pkg.__path__):
            if mod.name != "ray_pool":
                importlib.import_module(f"{pkg.__name__}.{mod.name}")


def _command(req: dict, model_dir: str) -> None:
    root = Path(req["root"])
    if req["cmd"] == "compact":
        compact(root)
    else:
        ingest_tiny(model_dir, root, **req["config"])


def _trace() -> Counter:
    """Record every point reached instead of killing (fault "trace")."""
    hits: Counter = Counter()
    faults.point = lambda name: hits.update([name])
    return hits


def _child(req: dict, model_dir: str, out_fd: int, gate: tuple[int, int] | None = None) -> None:
    """The forked child: wait for the gate, arm the fault, run; report and exit without cleanup."""
    code, report = 0, {}
    os.dup2(2, 1)  # stdout is the server's answer channel
    try:
        if gate is not None:
            os.close(gate[1])  # else this child's own copy keeps the gate shut
            os.read(gate[0], 1)
        hits = None
        if req.get("fault") == "trace":
            hits = _trace()
        else:
            faults.arm(req.get("fault"))
        refusals, start = 0, time.monotonic()
        while True:
            try:
                _command(req, model_dir)
                break
            except StoreBusy:
                if not req.get("retry_busy") or time.monotonic() - start > RACE_SECONDS:
                    raise
                refusals += 1
                time.sleep(0.02)
        report = {"refusals": refusals, "trace": dict(hits or {})}
    except SelfRepairError as e:
        print(f"Error: {e}", file=sys.stderr)
        code = 1
    except BaseException:  # noqa: BLE001 - a child must exit, whatever happened
        traceback.print_exc()
        code = 2
    os.write(out_fd, json.dumps(report).encode())
    os._exit(code)


def _fork(req: dict, model_dir: str, gate: tuple[int, int] | None = None) -> tuple[int, int]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(req, model_dir, w, gate)
    os.close(w)
    return pid, r


def _finish(pid: int, r: int) -> dict:
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    report = json.loads(b"".join(chunks) or b"{}")
    return {"rc": os.waitstatus_to_exitcode(status), **report}


def main(model_dir: str) -> None:
    _cache_loader(model_dir)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if "run" in req:
            answer = _finish(*_fork(req["run"], model_dir))
        else:
            gate_r, gate_w = os.pipe()
            started = [_fork(r, model_dir, (gate_r, gate_w)) for r in req["race"]]
            os.close(gate_r)
            os.close(gate_w)  # every child's read returns now: they start together
            done = [_finish(pid, r) for pid, r in started]
            answer = {"rcs": [d["rc"] for d in done], "refusals": [d.get("refusals", 0) for d in done]}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
