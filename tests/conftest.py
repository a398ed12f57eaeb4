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
from tiny_models import ingest_tiny  # noqa: E402


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


@pytest.fixture(scope="session")
def tiny_store(tiny_model_dirs, tmp_path_factory) -> Path:
    """One store root holding all three tiny families, every ablation type, sr_mlps neuron detail."""
    store = tmp_path_factory.mktemp("store")
    for d in tiny_model_dirs.values():
        # sr_mlps neuron detail for the penultimate layer: the authors' neuron figures draw it
        ingest_tiny(d, store, sr_mlps_neurons="penultimate")
    return store
