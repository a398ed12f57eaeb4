"""The benchmark command runs end to end at tiny sizes (figures are timings: never asserted here).

`benchmarks/run.py --quick` runs in this process (its `main`, as `python benchmarks/run.py` calls
it): no second interpreter importing torch, and the Ray benchmark uses the Ray the suite's Ray
tests share (`ray_cluster`, tests/conftest.py) instead of starting one of its own. Torch keeps the suite's one thread
(`threads()`, one per core, is what the benchmark would set): on the 2-core CI machine two
spinning threads beside the other pytest worker are many times slower, and no figure is judged.
"""

import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]  # every benchmark at tiny sizes (Ray's too)

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _no_ray() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is None


@pytest.fixture
def bench_run(monkeypatch):
    """benchmarks/run.py imported as the script imports its modules (flat, from its folder); removed after."""
    import torch

    before = set(sys.modules)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import common
    import run

    monkeypatch.setattr(common, "threads", lambda: 1)
    monkeypatch.setattr(run, "threads", lambda: 1)
    yield run
    torch.set_num_threads(1)
    for name in set(sys.modules) - before:
        if getattr(sys.modules[name], "__file__", "") and Path(sys.modules[name].__file__).parent == BENCHMARKS:
            del sys.modules[name]


def test_benchmarks_quick_run_prints_every_figure(ray_cluster, bench_run, capsys):
    assert bench_run.main(["--quick"]) == 0
    out = capsys.readouterr().out
    for row in ("fast / reference throughput", "arithmetic efficiency (whole sweep)",
                "clean capture+write / bare forward", "query head_top_self_repair",
                "on-disk bytes per ablation_effects row", "CUDA: pythia-410m shape",
                "units / heads wall time", "conditioned / unconditioned wall time",
                "Ray executor, 1 worker vs in-process" if _no_ray() else "Ray 1-worker overhead vs in-process"):
        assert row in out, row
