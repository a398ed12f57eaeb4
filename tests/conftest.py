"""Shared fixtures: seeded RNGs, tiny model folders, and stores ingested from them.

The suite's own machinery lives here too (the classes are in tests/model_cache.py):
- one torch thread in this process and in every subprocess it starts (the tiny models are
  fastest on one thread, and two threads spinning on a busy 2-core machine are ten times slower);
- `model_cache`: each model folder is loaded once per session, every load gets a deep copy;
- `tiny_stores`: each tiny configuration is ingested once per run, every test gets a copy; the tiny
  models, `tiny_store` and these stores are built once per run by whichever pytest-xdist worker
  asks first, in a folder all workers see (the others wait for it on a file lock);
- `forks`: real `selfrepair` processes (to kill, to race) forked from a server that imported the
  package once (tests/cli_fork.py), instead of a cold interpreter and torch import for each;
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
import re
import shutil
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
from model_cache import LOAD_LOG, ModelCache, TinyStores, built_once, load_counts, shared_root  # noqa: E402
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
    items.sort(key=_run_order(items))


def _run_order(items):
    """The files on the shared Ray first, then the other files with a slow test, then the rest (the
    collection order kept otherwise): pytest-xdist hands whole files (SHARED groups, below) to its
    workers in this order, so the long ones start early and no worker is left with one at the end
    (pyproject: --no-loadscope-reorder). A file's tests stay together (its module fixtures are built
    once), and the tests on the shared Ray run one after another (one Ray start serves them all:
    `ray_cluster`): the first such file ends with them, the next ones start with them."""
    def on_ray(item) -> bool:
        return "ray_cluster" in getattr(item, "fixturenames", ())

    files: dict[Path, list] = {}
    for item in items:
        files.setdefault(item.path, []).append(item)
    ray_files = [p for p, its in files.items() if any(on_ray(i) for i in its)]
    mixed = [p for p in ray_files if not all(on_ray(i) for i in files[p])]
    ray_order = mixed[:1] + [p for p in ray_files if p not in mixed] + mixed[1:]
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def key(item):
        if item.path in ray_order:
            rank = ray_order.index(item.path)
            return 0, rank, on_ray(item) == (rank == 0)  # ray tests last in the first file, first after
        return (1 if item.path in slow_files else 2), 0, False

    return key


# Session resources that several files use, by the fixture names that reach them: pytest-xdist sends
# the files that use one of them to the same worker, together, so it is started once per run (not
# once per worker). `built` is the whole report of tiny_store (tests/analysis/conftest.py: tens of CPU
# seconds, and an object in memory, so it cannot be shared across workers as the stores are).
SHARED = {"ray_cluster": "ray_cluster", "forks": "forks", "built": "report", "report_dir": "report"}


def _shared_group(path: Path, cache: dict = {}) -> str | None:  # noqa: B006 - a cache per file
    """The SHARED resource a test file's functions take as an argument (the controller process sees
    no fixtures: it reads the file)."""
    if path not in cache:
        text = path.read_text() if path.suffix == ".py" and path.is_file() else ""
        cache[path] = next((group for name, group in SHARED.items()
                            if re.search(rf"def \w+\([^)]*\b{name}\b", text)), None)
    return cache[path]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, with the files that use a SHARED resource as one unit of work per resource."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            group = _shared_group(config.rootpath / path)
            return f"shared: {group}" if group else path

    return SharedTogether(config, log)


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
    """Torch on one thread in every test (tiny models: fastest, and immune to a busy machine); the benchmark
    smoke test, which times with more, sets it back to one after its run."""
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
    """The tiny models' folders, saved once per run for every worker (never to be changed)."""
    root = shared_root(tmp_path_factory) / "models"
    root.mkdir(exist_ok=True)
    return {f: built_once(root / f"tiny-{f}", lambda d, f=f: tiny_models.save(f, d)) for f in tiny_models.FAMILIES}


@pytest.fixture(scope="session")
def good_store(tiny_stores, tmp_path_factory) -> Path:
    """A small tiny-GPT-2 store (tiny_models.SMALL_STORE); the hostile-store tests damage copies of it."""
    return tiny_stores.copy("gpt2", tmp_path_factory.mktemp("good") / "s", **tiny_models.SMALL_STORE)


@pytest.fixture(scope="session")
def tiny_store(tiny_model_dirs, tmp_path_factory) -> Path:
    """One store root holding all three tiny families, every ablation type, sr_mlps neuron detail."""
    def build(store: Path) -> None:
        for d in tiny_model_dirs.values():
            # sr_mlps neuron detail for the penultimate layer: the authors' neuron figures draw it
            ingest_tiny(d, store, sr_mlps_neurons="penultimate")

    # Ingested once per run; each worker reads its own copy (a test that writes into it stays in its worker).
    pristine = built_once(shared_root(tmp_path_factory) / "tiny-store", build)
    store = tmp_path_factory.mktemp("store")
    shutil.copytree(pristine, store, symlinks=True, dirs_exist_ok=True)
    return store


# -- one local Ray per pytest process, shared by the tests that run on it -----------------------
@pytest.fixture
def ray_cluster() -> str | None:
    """A local Ray of 2 CPUs (no dashboard, a small object store): started by the first test that asks,
    kept for the tests right after it that ask too (they run one after another: the order above), and
    stopped after the last of them. Its address (an ingest or benchmark in this process uses it);
    None without the ray extra (a test that needs Ray skips itself then)."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False,
                 logging_level="WARNING")
    return ray.get_runtime_context().gcs_address


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    if "ray_cluster" in item.fixturenames and (nextitem is None or "ray_cluster" not in nextitem.fixturenames):
        ray = sys.modules.get("ray")
        if ray is not None:
            ray.shutdown()


@pytest.fixture(scope="session")
def forks(tmp_path_factory):
    """The fork server of this pytest process: `forks.cli(args)` runs `selfrepair ARGS` in a process of its own."""
    from cli_fork import ForkServer

    server = ForkServer(tmp_path_factory.mktemp("forks"))
    yield server
    server.close()


@pytest.fixture(scope="session")
def tiny_stores(tiny_model_dirs, tmp_path_factory) -> TinyStores:
    return TinyStores(tiny_model_dirs, shared_root(tmp_path_factory) / "pristine")
