"""`verify` checks shards against each other and the recorded configuration, and shows self-checks."""

import copy
import shutil

import pytest

from selfrepair.store.model_store import ModelStore
from selfrepair.store.verify import verify
from selfrepair.store.writer import Writer


@pytest.fixture(scope="module")
def small_store(tiny_stores, tmp_path_factory):
    """A copy of the session's small GPT-2 store (test_legacy_neurons' configuration); each test damages its own copy."""
    return tiny_stores.copy("gpt2", tmp_path_factory.mktemp("verify") / "s", tokens=124, seq_len=32, batch_size=2,
                            ablations=("zero",), heads="L1", top_p=0.05, neurons_top_k=3)


def _damaged(small_store, tmp_path, change):
    store = tmp_path / "s"
    shutil.copytree(small_store, store)
    with Writer.open(ModelStore(store / "tiny-gpt2")) as w:
        change(w)
    return verify(store)


def _copy_of_first_ablation(w, **changes):
    sid = min(s for s in w.manifest.shards if s.startswith("abl-"))
    entry = copy.deepcopy(dict(w.manifest.shards[sid].raw)) | changes
    w._append({"op": "shard", "id": sid + "-copy", "entry": entry, "supersedes": []})


def test_overlapping_shards_are_found(small_store, tmp_path):
    report = _damaged(small_store, tmp_path, _copy_of_first_ablation)
    assert any("overlap (zero draw 0, 4 unit(s))" in p for p in report.problems["tiny-gpt2"]), report.lines()


def test_shards_outside_the_recorded_configuration_are_found(small_store, tmp_path):
    report = _damaged(small_store, tmp_path, lambda w: _copy_of_first_ablation(w, ablation="mean"))
    problems = report.problems["tiny-gpt2"]
    assert any("ablation mean draw 0 is not in the recorded configuration" in p for p in problems), problems


def test_rows_outside_the_declared_batch_are_found(small_store, tmp_path):
    def shift(w):
        sid = min(s for s in w.manifest.shards if s.startswith("abl-"))
        w._append({"op": "shard", "id": sid, "entry": dict(w.manifest.shards[sid].raw) | {"rows": [2, 4]},
                   "supersedes": []})

    problems = _damaged(small_store, tmp_path, shift).problems["tiny-gpt2"]
    assert any("holds token_index 0..61, outside its rows 2..4" in p for p in problems), problems


def test_self_check_is_shown(small_store, tmp_path):
    check = {"tolerance": "1e-3 of max(1, |value|)", "bridge": "TransformerBridge",
             "deviations": {"clean logit: engine vs model": 2e-7, "d_logit zero L0H1: fast vs reference": 3e-6}}
    report = _damaged(small_store, tmp_path, lambda w: w.set(self_check=check))
    assert report.ok, report.lines()
    assert ("  ok   ingest self-check (TransformerBridge): 2 comparisons on the first batch, largest deviation "
            "3.0e-06 (d_logit zero L0H1: fast vs reference); tolerance 1e-3 of max(1, |value|)") in report.lines()
