"""`--executor ray`: a pool of Ray actors computes the jobs; the ingest's process commits them.

Each actor loads the model once (one GPU each, or CPUs when the cluster has none), then
computes jobs and writes their shard files into the store (`store/shards.py`), which
must therefore be on a filesystem every node sees. It returns the shard entry; the
driver, which holds the model folder's writer lock, commits it through the Writer, so
readers, `verify` and resume see exactly what a single-process run leaves.

Faults: a job whose worker dies (killed, out of host memory) or raises is retried on
another worker after its temporary files are removed; a completed but uncommitted file
is simply replaced by the retry (same shard id, rename into place). A job that fails
MAX_ATTEMPTS times, or a worker that fails MAX_ATTEMPTS jobs in a row, stops the run
with one line naming the job and the cause. A killed driver leaves uncommitted files
only, which the next run's start-up cleanup removes; re-running the command resumes.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections import Counter, deque
from dataclasses import replace
from pathlib import Path
from typing import Callable

from selfrepair.errors import ConfigError, DeviceError, SelfRepairError, WorkerFailed
from selfrepair.ingest.config import IngestConfig
from selfrepair.store import faults, shards
from selfrepair.store.model_store import ModelStore

MAX_ATTEMPTS = 3
MAX_PROBES = 20  # readiness probes of a restarting worker before giving up on it
# Fault injection for tests, read by the driver and handed to the workers:
#   kill:N:PATH  the first worker to finish writing its N-th job's files (and create PATH) is SIGKILLed
#                before returning the entry (PATH makes it happen once in the whole cluster);
#   fail:TEXT    every job whose shard id contains TEXT raises DeviceError on every worker.
FAULT_ENV = "SELFREPAIR_TEST_FAULT"


def import_ray():
    """The `ray` module, or a one-line ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("executor: Ray is not installed; pip install 'selfrepair[ray]' "
                          "(or pip install -e '.[ray]' in a checkout)") from None
    return ray


class UnitWorker:
    """One Ray actor: the model loaded once, then jobs computed and their files written.

    Args:
        cfg: the run's configuration (device set to the worker's: cuda or cpu).
        folder: the model folder (a path every node sees).
        index: the worker's number in the pool (for messages).
        fault: the test fault spec (see FAULT_ENV), or None.
    """

    def __init__(self, cfg: IngestConfig, folder: str, index: int, fault: str | None = None):
        from selfrepair.ingest.models import load_model
        from selfrepair.ingest.jobs import JobRunner
        from selfrepair.ingest.weights import read_weights

        # Only the reference engine drives the TransformerBridge; the fast engine's workers skip it.
        model = load_model(cfg.model, cfg.device, cfg.revision, bridge=cfg.engine == "reference")
        w = read_weights(model.hf_model, cfg.seq_len, cfg.preset)
        self.runner = JobRunner(cfg, model, w, ModelStore(Path(folder)), log=lambda *a, **k: None)
        self.index, self.fault, self.done = index, fault or "", 0
        self.place = f"{socket.gethostname()} pid {os.getpid()} on {model.device}"

    def where(self) -> str:
        return self.place

    def run(self, job) -> dict:
        """Compute one job and write its files; returns its shard entry (not committed)."""
        kind, _, arg = self.fault.partition(":")
        if kind == "fail" and arg in job.shard_id:
            raise DeviceError("out of GPU memory even with one head per pass (injected by "
                              f"{FAULT_ENV}); lower --batch-size")
        entry = self.runner.run(job)
        faults.point("ray.worker.written")
        self.done += 1
        if kind == "kill":
            n, _, marker = arg.partition(":")
            if self.done == int(n) and _claim(marker):
                os.kill(os.getpid(), signal.SIGKILL)  # files written, entry never returned: mid-job
        return entry


def _claim(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _restarting(ray, e: Exception) -> bool:
    return isinstance(e, ray.exceptions.ActorUnavailableError) and "restarting" in str(e)


def _cause(ray, e: Exception) -> str:
    """One line saying why a job failed."""
    if isinstance(e, ray.exceptions.RayTaskError):
        c = e.cause
        if isinstance(c, SelfRepairError):
            return f"{type(c).__name__}: {c}"
        text = str(c).strip().splitlines()
        return f"{type(c).__name__}: {text[-1] if text else ''}".strip()
    if isinstance(e, ray.exceptions.RayActorError):
        if getattr(e, "actor_init_failed", False):
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            return "the worker could not start (loading the model): " + (lines[-1] if lines else "unknown")
        return "the worker process died (killed, out of host memory, or crashed)"
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


class RayPool:
    """The Ray executor. Connects (or starts a local Ray), starts the actors; `run` dispatches jobs.

    Args:
        cfg: the run's configuration (`ray_address`, `workers`, `device`).
        ms: the model folder.
        log: where retries are reported.
    """

    def __init__(self, cfg: IngestConfig, ms: ModelStore, log=print):
        self.ray = ray = import_ray()
        self.cfg, self.ms, self.log = cfg, ms, log
        self._owns_ray = False
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": "WARNING"}
            try:
                if cfg.ray_address:
                    ray.init(address=cfg.ray_address, **kwargs)
                else:
                    ray.init(**kwargs)  # a Ray of this machine alone, stopped at the end
            except ConnectionError as e:
                raise ConfigError(f"ray_address: cannot reach a Ray cluster at {cfg.ray_address} ({e}); "
                                  "start one with `ray start --head` first") from None
            self._owns_ray = True
        self.actors = []
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        ray, cfg = self.ray, self.cfg
        res = ray.cluster_resources()
        gpus = 0 if cfg.device == "cpu" else int(res.get("GPU", 0))
        cpus = int(res.get("CPU", 1))
        if gpus:
            n = cfg.workers or gpus
            if n > gpus:
                raise ConfigError(f"workers: {n} asked, the Ray cluster has {gpus} GPUs")
            per_cpu = max(1, min(4, cpus // n))
            opts = {"num_gpus": 1, "num_cpus": per_cpu}
            device = "cuda"
        else:
            if cfg.device == "cuda":
                raise DeviceError("--device cuda: the Ray cluster has no GPU")
            n = cfg.workers or 1
            if n > cpus:
                raise ConfigError(f"workers: {n} asked, the Ray cluster has {cpus} CPUs")
            biggest = max((int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")),
                          default=cpus)
            # Each CPU worker gets an equal share of the cores (torch's threads follow it), and fits on a node.
            per_cpu = max(1, min(biggest, cpus // n))
            opts = {"num_cpus": per_cpu}
            device = "cpu"
        self.n, self.opts = n, opts
        self.kind = f"1 GPU, {per_cpu} CPU" if gpus else f"{per_cpu} CPU"
        # A dead actor is restarted (its model loaded again); its job is retried by the driver, not by Ray,
        # so the driver sees every failure, sends the job to another worker and counts attempts.
        actor = ray.remote(UnitWorker).options(max_restarts=-1, max_task_retries=0, **opts, **faults.ray_options())
        worker_cfg = replace(cfg, device=device, quiet=True)
        fault = os.environ.get(FAULT_ENV)
        self.actors = [actor.remote(worker_cfg, str(self.ms.path), i, fault) for i in range(n)]

    def describe(self) -> str:
        address = self.cfg.ray_address or "local"
        return (f"executor ray: {self.n} worker(s) ({self.kind} each) on the Ray cluster at {address}; "
                f"the store must be on a filesystem every node sees")

    def run(self, jobs: list, commit: Callable[[object, dict], None], progress: Callable[[int], None]) -> None:
        """Compute every job on the pool; commit each (in this process) as it arrives."""
        ray = self.ray
        pending = deque(jobs)
        failed_on: dict[str, int] = {}  # shard id -> the worker its last attempt failed on
        attempts: Counter = Counter()
        streak = [0] * self.n  # failures in a row per worker
        probes = [0] * self.n  # failed readiness probes (and calls refused while restarting) since its last job
        idle = deque(range(self.n))
        inflight: dict = {}  # ref -> (job, worker); job None: a readiness probe of a restarting worker
        while pending or any(u is not None for u, _ in inflight.values()):
            while idle and pending:
                i = idle.popleft()
                job = _take(pending, failed_on, i)
                inflight[self.actors[i].run.remote(job)] = (job, i)
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            job, i = inflight.pop(ref)
            try:
                entry = ray.get(ref)
            except ray.exceptions.RayError as e:
                cause = _cause(ray, e)
                if job is None:  # still restarting: ask again shortly
                    probes[i] += 1
                    if probes[i] >= MAX_PROBES:
                        raise WorkerFailed(f"worker {i} did not come back after it died: {cause}") from None
                    time.sleep(0.2 * probes[i])
                    inflight[self.actors[i].where.remote()] = (None, i)
                    continue
                if _restarting(ray, e):  # sent to a worker Ray is still restarting: the job never ran
                    probes[i] += 1
                    if probes[i] >= MAX_PROBES:
                        raise WorkerFailed(f"worker {i} did not come back after it died: {cause}") from None
                    pending.appendleft(job)
                    inflight[self.actors[i].where.remote()] = (None, i)
                    continue
                attempts[job.shard_id] += 1
                streak[i] += 1
                if attempts[job.shard_id] >= MAX_ATTEMPTS or streak[i] >= MAX_ATTEMPTS:
                    times = attempts[job.shard_id]
                    raise WorkerFailed(f"job {job.describe()} failed ({times} attempt{'s' * (times > 1)}, "
                                       f"worker {i} failed {streak[i]} job(s) in a row): {cause}") from None
                self.log(f"worker {i}: job {job.shard_id} failed ({cause}); retrying it on another worker")
                shards.remove_leftovers(self.ms, job.shard_id)
                failed_on[job.shard_id] = i
                pending.appendleft(job)
                if isinstance(e, ray.exceptions.RayActorError):
                    # Ray restarts the actor (the model loads again); calls made before it is back fail,
                    # so it takes jobs again only once a probe answers.
                    inflight[self.actors[i].where.remote()] = (None, i)
                else:
                    idle.append(i)
                continue
            if job is None:
                idle.append(i)
                continue
            streak[i] = probes[i] = 0
            idle.append(i)
            commit(job, entry)
            progress(job.size)

    def close(self) -> None:
        """Stop the actors (and the Ray this run started)."""
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        if self._owns_ray:
            self.ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> "RayPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _take(pending: deque, failed_on: dict, worker: int):
    """The first pending job that did not last fail on `worker` (retries go elsewhere when they can)."""
    for k, job in enumerate(pending):
        if failed_on.get(job.shard_id) != worker:
            del pending[k]
            return job
    return pending.popleft()
