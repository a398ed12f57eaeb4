"""SIGKILL an ingest at random moments of both phases, resume each time, and compare with
an uninterrupted run: same rows, same values, no duplicates, no gaps, and `verify` passes.

Each killed ingest is a process of its own, forked from the session's fork server (tests/cli_fork.py:
the package already imported, so it starts in milliseconds instead of seconds)."""

import random
import signal
import time

import polars as pl
import pytest
from click.testing import CliRunner

from selfrepair import Store
from selfrepair.cli import main
from selfrepair.errors import SelfRepairError
from selfrepair.store.model_store import ModelStore
from selfrepair.store.schema import TABLES
from selfrepair.store.verify import verify

pytestmark = pytest.mark.slow  # six ingest processes, each killed

ARGS = ["--tokens", str(31 * 24), "--seq-len", "32", "--batch-size", "2", "--corpus", "embedded",
        "--ablations", "resample,mean,zero", "--neurons-top-k", "3", "--top-p", "0.05", "--quiet"]
N_CLEAN, N_SHARDS = 12, 12 * 4


def _args(model_dir, store):
    return ["ingest", "--model", str(model_dir), "--store", str(store), *ARGS]


def _shards(store) -> dict:
    try:
        return ModelStore(store / "tiny-llama").manifest().shards
    except SelfRepairError:
        return {}


def _tables(store) -> dict[str, pl.DataFrame]:
    s = Store.open(store)
    return {name: s.sql(f"SELECT * FROM {name}").sort(list(t.key)) for name, t in TABLES.items()}


def test_sigkill_at_random_moments_then_resume(tiny_model_dirs, forks, tmp_path):
    model = tiny_model_dirs["llama"]
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    # The uninterrupted run needs no process of its own: the same command, in this process.
    res = CliRunner().invoke(main, _args(model, reference))
    assert res.exit_code == 0, res.output
    rng = random.Random(7)
    # Kill points: after k committed shards (+ a random few ms, to land mid-shard too),
    # three in the clean phase and three in the ablation phase.
    targets = sorted(rng.sample(range(1, N_CLEAN), 3)) + sorted(rng.sample(range(N_CLEAN + 1, N_SHARDS - 2), 3))
    kills = []
    for target in targets:
        proc = forks.cli(_args(model, crashed))
        deadline = time.time() + 120
        while len(_shards(crashed)) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.03))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills.append(len(_shards(crashed)))
    assert len(kills) >= 5, kills
    assert any(k < N_CLEAN for k in kills) and any(k > N_CLEAN for k in kills), kills
    done = CliRunner().invoke(main, _args(model, crashed))  # the resume: in this process
    assert done.exit_code == 0, done.output
    assert len(_shards(crashed)) == N_SHARDS
    got, want = _tables(crashed), _tables(reference)
    for name in TABLES:
        # A run without a condition stores no condition run, and without --counterfactuals no re-run.
        if name in ("condition_tokens", "counterfactual_runs", "counterfactual_sources"):
            assert got[name].height == want[name].height == 0, name
            continue
        assert got[name].height == want[name].height > 0, name
        assert got[name].equals(want[name]), name
        key = list(TABLES[name].key)
        assert got[name].select(key).is_duplicated().sum() == 0, name
    report = verify(crashed)
    assert report.ok, report.lines()
    # No leftover temporary or orphan files.
    assert not [p for p in crashed.rglob("*.tmp")]
