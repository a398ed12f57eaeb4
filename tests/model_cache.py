"""The test suite's sharing machinery (used by tests/conftest.py): a model cache per model folder,
tiny stores ingested once per configuration and handed out as copies, what is built once per run
for every pytest-xdist worker, and the model-load count."""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable

from tiny_models import ingest_tiny

LOAD_LOG = "SELFREPAIR_LOAD_LOG"  # ingest/models.py appends one line per model load to this file


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


def shared_root(tmp_path_factory) -> Path:
    """A folder of this run that every pytest-xdist worker sees: the run's base temporary folder (a
    worker's own is a folder in it, named after the worker); this process's own without xdist."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(folder: Path, build: Callable[[Path], object]) -> Path:
    """`folder`, built by `build(folder)` by the first process of the run that asks (the others wait for it
    on a file lock, then find it built): each tiny model or store is made once per run, not once per
    worker. Something half built (its build failed) is built again by the next process that asks."""
    from filelock import FileLock

    done = folder.with_name(folder.name + ".built")
    with FileLock(str(folder.with_name(folder.name + ".lock"))):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            build(folder)
            done.touch()
    return folder


class ModelCache:
    """`load_model` memoised per model folder: each folder is loaded once per session and every
    call gets a deep copy, so no test sees another's changes (an ingest hooks its model, a test
    may move or break it). A folder whose files changed since (a test that damages a model) is
    loaded again; hub ids are never cached, nor is a load while a test patches what load_model
    calls. SELFREPAIR_TEST_MODEL_CACHE=0 switches the cache off."""

    def __init__(self, real):
        self.real, self.models = real, {}
        self.loaders = self._loaders()

    @staticmethod
    def _loaders() -> list:
        """What load_model calls: a test that patches one of them (to make a load fail) bypasses the cache."""
        import transformers
        from transformer_lens.model_bridge import TransformerBridge

        from selfrepair.ingest import families, models

        return [transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained,
                TransformerBridge.boot_transformers, models.load_hf, models.resolve, families.family_of]

    def key(self, name: str, device: str, revision):
        from selfrepair.errors import SelfRepairError
        from selfrepair.ingest.models import pick_device, resolve

        if self._loaders() != self.loaders:
            return None
        try:
            path = resolve(name).path
        except SelfRepairError:
            return None  # the real load raises it
        if path is None or not path.exists():
            return None
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        stats = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file())
        return str(path.resolve()), pick_device(device), revision, stats

    def __call__(self, name: str, device: str = "auto", revision: str | None = None):
        key = self.key(name, device, revision)
        if key is None:
            return self.real(name, device, revision)
        if key in self.models:
            with open(os.environ[LOAD_LOG], "a") as f:
                f.write(f"{os.getpid()}\tcached\t{name}\n")
        else:
            self.models[key] = self.real(name, device, revision)
        return copy.deepcopy(self.models[key])


class TinyStores:
    """Stores of the tiny models, each configuration ingested once per run.

    `copy(family, dest, **settings)` ingests `family` with ingest_tiny's settings and `settings`
    the first time a configuration is asked for in the run (by any pytest-xdist worker: `root` is
    a folder they all see, `built_once`), and hands out a fresh copy of that pristine store into
    `dest` (new or empty) every time: a test may damage, extend or compact its copy, and no other
    test sees it. The copy holds the same model folder path, so resuming or extending it with the
    same model works as on the original."""

    def __init__(self, model_dirs: dict[str, Path], root: Path):
        self.model_dirs, self.root = model_dirs, root
        root.mkdir(parents=True, exist_ok=True)

    def pristine(self, family: str, **settings) -> Path:
        """The run's one store of this configuration (never to be changed: tests get copies)."""
        key = repr((family, tuple(sorted((k, repr(v)) for k, v in settings.items()))))
        folder = self.root / f"{family}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        return built_once(folder, lambda f: ingest_tiny(self.model_dirs[family], f, **settings))

    def copy(self, family: str, dest: Path, **settings) -> Path:
        shutil.copytree(self.pristine(family, **settings), dest, symlinks=True, dirs_exist_ok=True)
        return dest
