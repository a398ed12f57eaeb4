"""Make a partial copy of a store: a model folder whose manifest keeps only some ablation shards,
as an ingest interrupted mid-sweep (or run with fewer tokens for one draw) leaves it."""

from __future__ import annotations

import shutil
from pathlib import Path

from dataclasses import replace

from selfrepair.store.model_store import ModelStore
from selfrepair.store.writer import Writer


def drop_shards(folder: Path, keep) -> list[str]:
    """Rewrite `folder`'s manifest without the ablation shards for which `keep(entry)` is false; their files
    stay on disk, uncommitted (as a killed ingest leaves them). Returns the dropped shard ids."""
    with Writer.open(ModelStore(folder)) as w:
        shards = w.manifest.shards
        dropped = [sid for sid, e in shards.items() if e.phase == "ablation" and not keep(e)]
        w.manifest = replace(w.manifest, shards={sid: e for sid, e in shards.items() if sid not in dropped})
        w.checkpoint()  # a new checkpoint of the snapshot without them (the files stay)
    return dropped


def partial_copy(model_folder: Path, dest_root: Path, keep) -> Path:
    """A copy of one model folder under `dest_root`, made partial by `drop_shards`; returns the store root."""
    target = dest_root / model_folder.name
    shutil.copytree(model_folder, target, symlinks=True)
    drop_shards(target, keep)
    return dest_root
