"""Out of disk space during a shard, and out of GPU memory in the sweep (both simulated)."""

import errno

import pytest
import torch
from click.testing import CliRunner

from tiny_models import ingest_tiny
from selfrepair import Store
from selfrepair.cli import main
from selfrepair.errors import DeviceError
from selfrepair.ingest import ablate
from selfrepair.store import files
from selfrepair.store.verify import verify

KEY = ["ablation", "sample", "layer", "head", "token_index"]


def test_out_of_disk_space_keeps_committed_shards(tiny_model_dirs, tmp_path, monkeypatch):
    store = tmp_path / "s"
    real = files.pq.write_table
    calls = {"n": 0}

    def full_disk(table, where, **kw):
        calls["n"] += 1
        if calls["n"] == 8:  # the third clean shard's first file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(files.pq, "write_table", full_disk)
    args = ["ingest", "--model", str(tiny_model_dirs["gpt2"]), "--store", str(store), "--tokens", "310",
            "--seq-len", "32", "--corpus", "embedded", "--quiet"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert lines[-1].startswith("Error: out of disk space while writing ")
    assert "Traceback" not in res.output
    before = Store.open(store).sql("SELECT count(*) AS n FROM tokens")["n"][0]
    assert before == 2 * 4 * 31  # two whole clean shards survived, nothing half-written
    assert verify(store).ok
    monkeypatch.setattr(files.pq, "write_table", real)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert Store.open(store).sql("SELECT count(*) AS n FROM tokens")["n"][0] == 310
    assert verify(store).ok


def test_out_of_memory_halves_heads_per_pass_and_matches(tiny_model_dirs, tmp_path, monkeypatch):
    ingest_tiny(tiny_model_dirs["gpt2"], tmp_path / "plain", heads_per_pass=4, ablations=("zero",))
    real = ablate.FastBatch.patch

    def tight_memory(self, layer, heads, z_new, u):
        if len(heads) > 1:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return real(self, layer, heads, z_new, u)

    monkeypatch.setattr(ablate.FastBatch, "patch", tight_memory)
    ingest_tiny(tiny_model_dirs["gpt2"], tmp_path / "tight", heads_per_pass=4, ablations=("zero",))
    a = Store.open(tmp_path / "plain").sql("SELECT * FROM ablation_effects").sort(KEY)
    b = Store.open(tmp_path / "tight").sql("SELECT * FROM ablation_effects").sort(KEY)
    assert a.height == b.height > 0
    for col in ("d_logit", "de", "d_de_heads", "d_de_mlps", "ln_scale"):
        assert (a[col] - b[col]).abs().max() < 1e-5


def test_out_of_memory_with_one_head_fails_clearly(tiny_model_dirs, tmp_path, monkeypatch):
    def no_memory(self, layer, heads, z_new, u):
        raise torch.OutOfMemoryError("simulated: CUDA out of memory")

    monkeypatch.setattr(ablate.FastBatch, "patch", no_memory)
    with pytest.raises(DeviceError, match="out of GPU memory even with one head per pass"):
        ingest_tiny(tiny_model_dirs["gpt2"], tmp_path / "s", ablations=("zero",))
    res = CliRunner().invoke(main, ["ingest", "--model", str(tiny_model_dirs["gpt2"]), "--store",
                                    str(tmp_path / "s"), "--tokens", "310", "--seq-len", "32",
                                    "--batch-size", "4", "--corpus", "embedded", "--ablations", "zero", "--quiet",
                                    "--top-p", "0.05", "--neurons-top-k", "5"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1].startswith("Error: out of GPU memory even with one head per pass")
