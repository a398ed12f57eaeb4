"""Executors: who computes an ingest's jobs. The ingest's own process always commits them.

`InProcess` (the default) computes each job on the model the ingest loaded, in plan
order. `RayPool` (`ingest/ray_pool.py`, `--executor ray`) spreads them over Ray actors
that each load the model once. Both call `commit(job, entry)` in the ingest's process,
one job at a time, and `progress(n)` as work is done.
"""

from __future__ import annotations

from typing import Callable, Protocol

from selfrepair.ingest.config import IngestConfig
from selfrepair.ingest.jobs import JobRunner
from selfrepair.store.model_store import ModelStore

Commit = Callable[[object, dict], None]
EXECUTORS = ("inprocess", "ray")


class Executor(Protocol):
    def describe(self) -> str: ...

    def run(self, jobs: list, commit: Commit, progress: Callable[[int], None]) -> None: ...

    def __enter__(self) -> "Executor": ...

    def __exit__(self, *exc) -> None: ...


class InProcess:
    """Jobs computed one after another on the ingest's own model."""

    def __init__(self, cfg: IngestConfig, model, w, ms: ModelStore, log=print):
        self.runner = JobRunner(cfg, model, w, ms, log)
        self.device = model.device

    def describe(self) -> str:
        return f"executor inprocess (one process on {self.device})"

    def run(self, jobs: list, commit: Commit, progress: Callable[[int], None]) -> None:
        for job in jobs:
            commit(job, self.runner.run(job, progress))

    def __enter__(self) -> "InProcess":
        return self

    def __exit__(self, *exc) -> None:
        pass


def make_executor(cfg: IngestConfig, model, w, ms: ModelStore, log=print) -> Executor:
    """The executor `cfg.executor` names (Ray's workers are started here and load the model now)."""
    if cfg.executor == "ray":
        from selfrepair.ingest.ray_pool import RayPool

        return RayPool(cfg, ms, log)
    return InProcess(cfg, model, w, ms, log)
