"""Shared fixtures: seeded RNGs, tiny model folders, and stores ingested from them.

The suite's own machinery lives here too:
- one torch thread in this process and in every subprocess it starts (the tiny models are
  fastest on one thread, and two threads spinning on a busy 2-core machine are ten times slower);
- a count of model loads, in-process and in subprocesses, printed at the end of the run
  (`ingest/models.py` appends one line per load to $SELFREPAIR_LOAD_LOG);
- markers: `ingest` for a test that ingests or loads a tiny model (given by its fixtures),
  `slow` and `browser` set by the test modules; all of them run by default.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

# Before torch (or numpy) is imported anywhere: subprocesses inherit the environment.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import tiny_models  # noqa: E402
from tiny_models import ingest_tiny  # noqa: E402

LOAD_LOG = "SELFREPAIR_LOAD_LOG"
# A test that asks for one of these fixtures ingests or loads a tiny model: marked `ingest`.
INGEST_FIXTURES = {"tiny_model_dirs", "tiny_store", "tiny_query_store", "built", "report_dir", "tiny_stores"}


# -- session machinery -------------------------------------------------------------------
def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the main pytest process (not an xdist worker)
        fd, path = tempfile.mkstemp(prefix="selfrepair-loads-", suffix=".log")
        os.close(fd)
        os.environ[LOAD_LOG] = path  # workers and subprocesses inherit it
        config._selfrepair_load_log = path
    with open(os.environ[LOAD_LOG], "a") as f:
        f.write(f"{os.getpid()}\tpytest\t\n")  # this process's loads are the in-process ones


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INGEST_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ingest)


def load_counts(path: str) -> dict:
    """Model loads from the load log: in-process, in subprocesses, served by the cache, per model.

    Lines: `pid<TAB>model` from load_model, `pid<TAB>pytest<TAB>` for each pytest process
    (xdist workers too), `pid<TAB>cached<TAB>model` for a load the ModelCache served."""
    rows = [line.split("\t") for line in Path(path).read_text().splitlines()]
    pytest_pids = {r[0] for r in rows if r[1:] == ["pytest", ""]}
    loads = [r for r in rows if len(r) == 2]
    inproc = sum(r[0] in pytest_pids for r in loads)
    return {"loads": len(loads), "in_process": inproc, "subprocess": len(loads) - inproc,
            "cached": sum(len(r) == 3 and r[1] == "cached" for r in rows),
            "per_model": Counter(Path(r[1]).name for r in loads)}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    path = getattr(config, "_selfrepair_load_log", None)
    if not path or not os.path.exists(path):
        return
    n = load_counts(path)
    most = ", ".join(f"{name} {k}" for name, k in n["per_model"].most_common(4))
    terminalreporter.write_line(
        f"model loads: {n['loads']} (in-process {n['in_process']}, subprocess {n['subprocess']}); "
        f"{n['cached']} more served by the test model cache" + (f"; most loaded: {most}" if most else ""))
    os.unlink(path)


class ModelCache:
    """`load_model` memoised per model folder: each folder is loaded once per session and every
    call gets a deep copy, so no test sees another's changes (an ingest hooks its model, a test
    may move or break it). A folder whose files changed since (a test that damages a model) is
    loaded again; hub ids are never cached. SELFREPAIR_TEST_MODEL_CACHE=0 switches it off."""

    def __init__(self, real):
        self.real, self.models = real, {}

    def key(self, name: str, device: str, dtype: str, revision):
        from selfrepair.errors import SelfRepairError
        from selfrepair.ingest.models import pick_device, resolve

        try:
            path = resolve(name).path
        except SelfRepairError:
            return None  # the real load raises it
        if path is None or not path.exists():
            return None
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        stats = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file())
        return str(path.resolve()), pick_device(device), dtype, revision, stats

    def __call__(self, name: str, device: str = "auto", dtype: str = "float32", revision: str | None = None):
        import copy

        key = self.key(name, device, dtype, revision)
        if key is None:
            return self.real(name, device, dtype, revision)
        if key in self.models:
            with open(os.environ[LOAD_LOG], "a") as f:
                f.write(f"{os.getpid()}\tcached\t{name}\n")
        else:
            self.models[key] = self.real(name, device, dtype, revision)
        return copy.deepcopy(self.models[key])


@pytest.fixture(scope="session", autouse=True)
def model_cache():
    """Install the ModelCache wherever `load_model` was imported from ingest/models.py."""
    from selfrepair.ingest import models

    if os.environ.get("SELFREPAIR_TEST_MODEL_CACHE", "1") == "0":
        yield None
        return
    real = models.load_model
    cache = ModelCache(real)
    with pytest.MonkeyPatch.context() as mp:
        for name, module in list(sys.modules.items()):
            if name.startswith("selfrepair") and getattr(module, "load_model", None) is real:
                mp.setattr(module, "load_model", cache)
        yield cache


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


# -- tiny models and stores ----------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {f: tiny_models.save(f, root / f"tiny-{f}") for f in tiny_models.FAMILIES}


@pytest.fixture(scope="session")
def tiny_store(tiny_model_dirs, tmp_path_factory) -> Path:
    """One store root holding all three tiny families, every ablation type, sr_mlps neuron detail."""
    store = tmp_path_factory.mktemp("store")
    for d in tiny_model_dirs.values():
        # sr_mlps neuron detail for the penultimate layer: the authors' neuron figures draw it
        ingest_tiny(d, store, sr_mlps_neurons="penultimate")
    return store


class TinyStores:
    """Stores of the tiny models, each configuration ingested once per session.

    `copy(family, dest, **settings)` ingests `family` with ingest_tiny's settings and `settings`
    the first time a configuration is asked for, and hands out a fresh copy of that pristine
    store into `dest` (new or empty) every time: a test may damage, extend or compact its copy, and no other
    test sees it. The copy holds the same model folder path, so resuming or extending it with
    the same model works as on the original."""

    def __init__(self, model_dirs: dict[str, Path], root: Path):
        self.model_dirs, self.root, self.stores = model_dirs, root, {}

    def copy(self, family: str, dest: Path, **settings) -> Path:
        key = (family, tuple(sorted((k, repr(v)) for k, v in settings.items())))
        if key not in self.stores:
            store = self.root / f"{len(self.stores):03d}-{family}"
            ingest_tiny(self.model_dirs[family], store, **settings)
            self.stores[key] = store
        shutil.copytree(self.stores[key], dest, symlinks=True, dirs_exist_ok=True)
        return dest


@pytest.fixture(scope="session")
def tiny_stores(tiny_model_dirs, tmp_path_factory) -> TinyStores:
    return TinyStores(tiny_model_dirs, tmp_path_factory.mktemp("pristine"))
