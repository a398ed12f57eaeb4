"""The benchmark command runs end to end at tiny sizes (figures are timings: never asserted here)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]  # every benchmark at tiny sizes (Ray's too), in a process of its own

ROOT = Path(__file__).parents[1]


def _no_ray() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is None


def test_benchmarks_quick_run_prints_every_figure():
    res = subprocess.run([sys.executable, "benchmarks/run.py", "--quick"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    for row in ("fast / reference throughput", "arithmetic efficiency (whole sweep)",
                "clean capture+write / bare forward", "query head_top_self_repair",
                "on-disk bytes per ablation_effects row", "CUDA: pythia-410m shape",
                "units / heads wall time", "conditioned / unconditioned wall time",
                "Ray executor, 1 worker vs in-process" if _no_ray() else "Ray 1-worker overhead vs in-process"):
        assert row in res.stdout, row
