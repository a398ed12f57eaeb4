"""`--executor ray`: the same store as a single-process run, with 1 and 2 workers, and through
faults: a worker SIGKILLed mid-unit, a unit that keeps failing, a killed driver.

One local Ray cluster of 2 CPUs is shared by the whole module, and by the other tests on Ray that
run in this pytest process (Ray starts slowly): `ray_cluster`, tests/conftest.py.
"""

import signal
import subprocess
import sys
import time

import polars as pl
import pytest
from click.testing import CliRunner

from selfrepair import Store
from selfrepair.cli import main
from selfrepair.errors import SelfRepairError, WorkerFailed
from selfrepair.store.model_store import ModelStore
from selfrepair.store.schema import TABLES
from selfrepair.store.verify import verify
from tiny_models import ingest_tiny

pytestmark = [pytest.mark.slow, pytest.mark.ray]  # a local Ray cluster; its workers are processes of their own

ray = pytest.importorskip("ray", reason="the ray extra (pip install -e '.[test,ray]') runs these tests")

FAULT_ENV = "SELFREPAIR_TEST_FAULT"
# ingest_tiny's settings: 10 rows in 3 batches, so 3 clean units and 3 × 3 ablation units.
N_SHARDS = 3 + 9


@pytest.fixture(scope="module")
def reference(tiny_stores, tmp_path_factory):
    """The single-process store of the configuration every test here runs."""
    return tiny_stores.copy("llama", tmp_path_factory.mktemp("inprocess"))


def _tables(store) -> dict[str, pl.DataFrame]:
    s = Store.open(store)
    return {name: s.sql(f"SELECT * FROM {name}").sort(list(t.key)) for name, t in TABLES.items()}


def _assert_same_store(got_root, want_root,
                       empty=("condition_tokens", "counterfactual_runs", "counterfactual_sources")) -> None:
    """Every table equal, row for row, and none of them empty but those in `empty` (a run without --given
    has no condition run, one without --counterfactuals no re-run)."""
    got, want = _tables(got_root), _tables(want_root)
    for name in TABLES:
        assert got[name].height == want[name].height, name
        assert want[name].height > 0 or name in empty, name
        assert got[name].equals(want[name]), name
        assert got[name].select(list(TABLES[name].key)).is_duplicated().sum() == 0, name
    report = verify(got_root)
    assert report.ok, report.lines()


def _shards(store) -> dict:
    try:
        return ModelStore(store / "tiny-llama").manifest().shards
    except SelfRepairError:
        return {}


@pytest.mark.parametrize("workers", [1, 2])
def test_ray_equals_single_process(ray_cluster, reference, tiny_model_dirs, tmp_path, workers):
    result = ingest_tiny(tiny_model_dirs["llama"], tmp_path, executor="ray", workers=workers)
    assert result.shards_written == N_SHARDS
    _assert_same_store(tmp_path, reference)
    # The workers computed the output metrics too (the equality above covers their values).
    n = Store.open(tmp_path).sql("SELECT count(*) AS n, count(kl) AS kl, count(top1_changed) AS t FROM ablation_effects")
    assert n["n"][0] > 0 and n["kl"][0] == n["t"][0] == n["n"][0]


def test_worker_killed_mid_unit_is_retried(ray_cluster, reference, tiny_model_dirs, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "killed"
    # The first worker to finish writing its 2nd unit's files is SIGKILLed before it returns the entry.
    monkeypatch.setenv(FAULT_ENV, f"kill:2:{marker}")
    logs = []
    from selfrepair.ingest.config import IngestConfig
    from selfrepair.ingest.runner import Ingest

    cfg = IngestConfig(model=str(tiny_model_dirs["llama"]), store=tmp_path / "store", tokens=310, seq_len=32,
                       batch_size=4, ablations=("resample", "mean", "zero"), top_p=0.05, neurons_top_k=5,
                       corpus="embedded", executor="ray", workers=2)
    result = Ingest(cfg, log=logs.append).run()
    assert marker.exists()  # a worker really was killed
    retries = [line for line in logs if "retrying it on another worker" in line]
    assert len(retries) == 1, logs
    assert "the worker process died" in retries[0]
    assert result.shards_written == N_SHARDS  # every unit committed once
    _assert_same_store(tmp_path / "store", reference)
    assert not list((tmp_path / "store").rglob("*.tmp"))
    print(f"\nfault test: {retries[0]}; {result.shards_written} shards committed, tables equal to the "
          "uninterrupted run, verify OK")


def test_unit_that_keeps_failing_stops_the_run_with_one_line(ray_cluster, tiny_model_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "fail:abl-zero-s0-00000004")
    with pytest.raises(WorkerFailed) as e:
        ingest_tiny(tiny_model_dirs["llama"], tmp_path, executor="ray", workers=2)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("job abl-zero-s0-00000004-00000008-h")
    assert "(zero, rows 4-8, units L0H0…L1H3 (8)) failed (3 attempts" in msg
    assert msg.endswith("DeviceError: out of GPU memory even with one head per pass (injected by "
                        "SELFREPAIR_TEST_FAULT); lower --batch-size")
    # Everything else that finished is committed: re-running without the fault completes the store.
    assert "abl-zero-s0-00000004" not in " ".join(_shards(tmp_path))


def test_cli_reports_a_failing_unit_as_one_error_line(ray_cluster, tiny_model_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "fail:clean-00000000")
    args = ["ingest", "--model", str(tiny_model_dirs["llama"]), "--store", str(tmp_path), "--tokens", "62",
            "--seq-len", "32", "--batch-size", "1", "--corpus", "embedded", "--ablations", "zero", "--quiet",
            "--executor", "ray", "--workers", "2"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert errors == [res.output.strip().splitlines()[-1]]
    assert errors[0].startswith("Error: job clean-00000000-00000001 (clean pass, rows 0-1) failed (3 attempts")


def test_ray_options_need_the_ray_executor(tmp_path):
    res = CliRunner().invoke(main, ["ingest", "--store", str(tmp_path), "--workers", "2"])
    assert res.exit_code == 2
    assert "--workers only apply with --executor ray" in res.output


def test_killed_driver_resumes(ray_cluster, reference, tiny_model_dirs, tmp_path):
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "selfrepair", "ingest", "--model", str(tiny_model_dirs["llama"]),
           "--store", str(store), "--tokens", "310", "--seq-len", "32", "--batch-size", "4", "--corpus", "embedded",
           "--ablations", "resample,mean,zero", "--top-p", "0.05", "--neurons-top-k", "5", "--quiet",
           "--executor", "ray", "--ray-address", ray_cluster, "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while len(_shards(store)) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(_shards(store))
    assert 5 <= killed_at < N_SHARDS
    time.sleep(1)  # Ray stops the dead driver's workers
    # The resume needs no process of its own: the same command in this process, on the module's cluster.
    done = CliRunner().invoke(main, cmd[3:])
    assert done.exit_code == 0, done.output
    assert len(_shards(store)) == N_SHARDS
    _assert_same_store(store, reference)


def test_ray_runs_every_unit_kind_condition_and_sr_mlps_detail_as_in_process(ray_cluster, tiny_model_dirs, tmp_path):
    """Units of every kind, alone and given a condition, with neuron detail by sr_mlps and both counterfactual
    re-runs: the same tables."""
    settings = dict(tokens=124, units="L1H2,mlps,attn,BLOCK1,pair=L0H3+L1H0", given=("L0H1",),
                    sr_mlps_neurons="L1", ablations=("resample", "zero"),
                    counterfactuals=("frozen-norms", "frozen-attention"))
    ingest_tiny(tiny_model_dirs["llama"], tmp_path / "inprocess", **settings)
    ingest_tiny(tiny_model_dirs["llama"], tmp_path / "ray", executor="ray", workers=2, **settings)
    _assert_same_store(tmp_path / "ray", tmp_path / "inprocess", empty=())
    units = Store.open(tmp_path / "ray").sql("SELECT DISTINCT unit_kind, condition FROM ablation_effects")
    assert units.height == 10  # 5 kinds, alone and given L0H1
