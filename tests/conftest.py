"""Shared fixtures: seeded RNGs, tiny model folders, and stores ingested from them."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
sys.path.insert(0, str(Path(__file__).parent))

import tiny_models  # noqa: E402

ABLATIONS = ("resample", "mean", "zero")


@pytest.fixture(autouse=True)
def _seed():
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {f: tiny_models.save(f, root / f"tiny-{f}") for f in tiny_models.FAMILIES}


def ingest_tiny(model_dir: Path, store: Path, **overrides):
    from selfrepair.ingest.config import IngestConfig
    from selfrepair.ingest.runner import Ingest

    settings = dict(model=str(model_dir), store=store, tokens=310, seq_len=32, batch_size=4,
                    ablations=ABLATIONS, top_p=0.05, neurons_top_k=5, corpus="embedded", quiet=True)
    settings.update(overrides)
    return Ingest(IngestConfig(**settings)).run()


@pytest.fixture(scope="session")
def tiny_store(tiny_model_dirs, tmp_path_factory) -> Path:
    """One store root holding all three tiny families, every ablation type."""
    store = tmp_path_factory.mktemp("store")
    for d in tiny_model_dirs.values():
        ingest_tiny(d, store)
    return store
