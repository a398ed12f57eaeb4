"""The benchmark command runs end to end at tiny sizes (figures are timings: never asserted here)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_benchmarks_quick_run_prints_every_figure():
    res = subprocess.run([sys.executable, "benchmarks/run.py", "--quick"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    for row in ("fast / reference throughput", "arithmetic efficiency (whole sweep)",
                "clean capture+write / bare forward", "query head_top_self_repair",
                "on-disk bytes per ablation_effects row", "CUDA: pythia-410m shape"):
        assert row in res.stdout, row
