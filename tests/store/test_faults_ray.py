"""Fault injection on the Ray executor (issue 18, requirement 5; `store/faults.py`): a Ray worker
SIGKILLed after writing a unit's files, before the driver commits it.

Here, not in test_faults.py: it runs on the local Ray the suite's Ray tests share (`ray_cluster`,
tests/conftest.py; one Ray start serves them all), while test_faults.py's fork server runs its
campaign on another pytest worker. The store is checked as test_faults.py checks its stores:
the digest of fault_runner.py (rows, duplicate keys and SHA-256 of every table; `verify`) equal
to the single-process one-shot run's.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from fault_runner import _digest
from selfrepair.cli import main
from selfrepair.store import faults
from test_faults import BASE, assert_like
from tiny_models import ingest_tiny

pytestmark = [pytest.mark.slow, pytest.mark.ray]  # a local Ray cluster; its workers load the model

ray = pytest.importorskip("ray", reason="the ray extra (pip install -e '.[test,ray]') runs this test")

RAY = BASE | {"sr_mlps_neurons": "none"}  # test_faults.py's BASE without the sr_mlps phase: one phase fewer to kill in


@pytest.fixture(scope="module")
def reference(tiny_stores, tmp_path_factory) -> dict:
    """The single-process one-shot store of RAY and its digest."""
    root = tiny_stores.copy("gpt2", tmp_path_factory.mktemp("ray-reference"), **RAY)
    return {"root": root, "digest": _digest(root)}


def test_a_ray_worker_killed_after_writing_a_unit(ray_cluster, reference, tiny_model_dirs, tmp_path, monkeypatch):
    """`ray.worker.written` once in the cluster (SELFREPAIR_FAULT_ONCE): the worker dies with its unit's
    files written and its entry never returned; the driver retries the unit elsewhere and finishes.
    A rerun then has nothing to do, and the store equals the single-process one-shot run."""
    from selfrepair.ingest.config import IngestConfig
    from selfrepair.ingest.runner import Ingest

    root, marker = tmp_path / "ray", tmp_path / "ray-killed"
    monkeypatch.setenv(faults.ENV, "ray.worker.written")
    monkeypatch.setenv(faults.ONCE_ENV, str(marker))
    faults.arm(None)  # this process drives: only the workers read the variables
    logs: list[str] = []
    cfg = IngestConfig(**(dict(model=str(tiny_model_dirs["gpt2"]), store=root, corpus="embedded") | RAY
                          | {"ablations": tuple(RAY["ablations"]), "activations": tuple(RAY["activations"]),
                             "executor": "ray", "workers": 2}))  # not quiet: the retry is logged
    result = Ingest(cfg, log=logs.append).run()
    assert marker.exists()  # a worker really was killed there
    retries = [line for line in logs if "retrying it on another worker" in line]
    assert len(retries) == 1 and "the worker process died" in retries[0], logs
    monkeypatch.delenv(faults.ENV)
    monkeypatch.delenv(faults.ONCE_ENV)
    faults.arm(None)
    rerun = ingest_tiny(tiny_model_dirs["gpt2"], root, **RAY)  # single-process, as test_faults.py's reruns
    assert rerun.shards_written == 0  # nothing left to do
    assert_like(root, _digest(root), reference)
    assert CliRunner().invoke(main, ["verify", "--store", str(root)]).exit_code == 0
    print(f"\nray: {retries[0]}; {result.shards_written} shards committed; the rerun's store equals the "
          "one-shot run, 0 duplicate keys, verify OK")

