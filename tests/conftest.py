"""Shared fixtures: seeded RNGs, tiny model folders, and stores ingested from them.

The suite's own machinery lives here too (the classes are in tests/model_cache.py):
- one torch thread in this process and in every subprocess it starts (the tiny models are
  fastest on one thread, and two threads spinning on a busy 2-core machine are ten times slower);
- `model_cache`: each model folder is loaded once per session, every load gets a deep copy;
- `tiny_stores`: each tiny configuration is ingested once per session, every test gets a copy;
- a count of model loads, in-process and in subprocesses, printed at the end of the run
  (`ingest/models.py` appends one line per load to $SELFREPAIR_LOAD_LOG);
- markers: `ingest` for a test that ingests or loads a tiny model (given by its fixtures),
  `slow`, `browser`, `ray` and `embedded` set by the test modules; all of them run by default;
- pytest-xdist runs the files on every core (pyproject: `--dist loadfile`, so a module's
  fixtures are built once); session fixtures are built once per worker that needs them.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
from pathlib import Path

# Before torch (or numpy) is imported anywhere: subprocesses inherit the environment.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import tiny_models  # noqa: E402
from model_cache import LOAD_LOG, ModelCache, TinyStores, load_counts  # noqa: E402
from tiny_models import ingest_tiny  # noqa: E402

# A test that asks for one of these fixtures ingests or loads a tiny model: marked `ingest`.
INGEST_FIXTURES = {"tiny_model_dirs", "tiny_store", "tiny_query_store", "built", "report_dir", "tiny_stores", "good_store",
                   "unit_store"}


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
    # Files with a slow test run first (the order kept otherwise): pytest-xdist hands whole files
    # to its workers in this order, so the long ones start early and no worker is left with one at the end.
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


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


@pytest.fixture(scope="session", autouse=True)
def model_cache():
    """Install the ModelCache wherever `load_model` was imported from ingest/models.py (test modules too)."""
    from selfrepair.ingest import models

    if os.environ.get("SELFREPAIR_TEST_MODEL_CACHE", "1") == "0":
        yield None
        return
    real = models.load_model
    cache = ModelCache(real)
    with pytest.MonkeyPatch.context() as mp:
        for name, module in list(sys.modules.items()):
            if getattr(module, "__dict__", {}).get("load_model") is real:
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
def good_store(tiny_stores, tmp_path_factory) -> Path:
    """A small tiny-GPT-2 store (tiny_models.SMALL_STORE); the hostile-store tests damage copies of it."""
    return tiny_stores.copy("gpt2", tmp_path_factory.mktemp("good") / "s", **tiny_models.SMALL_STORE)


@pytest.fixture(scope="session")
def tiny_store(tiny_model_dirs, tmp_path_factory) -> Path:
    """One store root holding all three tiny families, every ablation type, sr_mlps neuron detail."""
    store = tmp_path_factory.mktemp("store")
    for d in tiny_model_dirs.values():
        # sr_mlps neuron detail for the penultimate layer: the authors' neuron figures draw it
        ingest_tiny(d, store, sr_mlps_neurons="penultimate")
    return store


@pytest.fixture(scope="session")
def tiny_stores(tiny_model_dirs, tmp_path_factory) -> TinyStores:
    return TinyStores(tiny_model_dirs, tmp_path_factory.mktemp("pristine"))
