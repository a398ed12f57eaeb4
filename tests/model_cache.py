"""The test suite's sharing machinery (used by tests/conftest.py): a model cache per model folder,
tiny stores ingested once per configuration and handed out as copies, and the model-load count."""

from __future__ import annotations

import copy
import os
import shutil
from collections import Counter
from pathlib import Path

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
    """Stores of the tiny models, each configuration ingested once per session.

    `copy(family, dest, **settings)` ingests `family` with ingest_tiny's settings and `settings`
    the first time a configuration is asked for, and hands out a fresh copy of that pristine
    store into `dest` (new or empty) every time: a test may damage, extend or compact its copy,
    and no other test sees it. The copy holds the same model folder path, so resuming or extending it with
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
