"""A store written before neuron_effects had `rank` (neurons ranked by abs(ΔDE), no neuron_totals):
it verifies and compacts as it is, and the next ingest redoes its ablation shards by the signed rule."""

import json

import pyarrow.parquet as pq
import pytest

from tiny_models import ingest_tiny
from selfrepair.store import files
from selfrepair.store.compact import compact
from selfrepair.store.model_store import ModelStore
from selfrepair.store.schema import LEGACY_COLUMNS
from selfrepair.store.verify import verify

SETTINGS = dict(tokens=124, seq_len=32, batch_size=2, ablations=("zero",), heads="L1", top_p=0.05, neurons_top_k=3)


def _make_legacy(store) -> None:
    """Rewrite an ingested store as the older code left it: neuron_effects without rank, no neuron_totals,
    shard entries carrying the older rule's digest."""
    ms = ModelStore(store / "tiny-gpt2")
    man = json.loads(ms.manifest_path.read_text())  # the ingest folded its commits into it
    legacy = LEGACY_COLUMNS["neuron_effects"][-1]  # before `rank` (and before units)
    for e in man["shards"].values():
        totals = e["files"].pop("neuron_totals", None)
        if totals:
            (ms.path / totals["path"]).unlink()
        entry = e["files"].get("neuron_effects")
        if entry:
            path = ms.path / entry["path"]
            table = pq.read_table(path).select(list(legacy))
            pq.write_table(table, path)
            entry.update(rows=table.num_rows, bytes=path.stat().st_size, sha256=files.sha256_file(path))
        if "top_sha" in e:
            e["top_sha"] = "0" * 16
    ms.manifest_path.write_text(json.dumps(man))


@pytest.fixture
def legacy(tiny_stores, tmp_path):
    store = tiny_stores.copy("gpt2", tmp_path / "legacy", **SETTINGS)  # a copy of its own: made legacy here
    _make_legacy(store)
    return store


def test_a_legacy_store_verifies_and_compacts(legacy):
    assert verify(legacy).ok, verify(legacy).lines()
    (result,) = compact(legacy)
    assert result.shards > 0
    report = verify(legacy)
    assert report.ok, report.lines()
    man = ModelStore(legacy / "tiny-gpt2").manifest()
    (entry,) = man.compacted["neuron_effects"]
    assert tuple(pq.read_schema(legacy / "tiny-gpt2" / entry.path).names) in LEGACY_COLUMNS["neuron_effects"]
    assert "neuron_totals" not in man.compacted


def test_ingesting_a_legacy_store_again_redoes_its_neuron_detail(legacy, tiny_model_dirs, tiny_stores, tmp_path):
    compact(legacy)  # the redone shards' rows leave the compacted files
    again = ingest_tiny(tiny_model_dirs["gpt2"], legacy, **SETTINGS)
    assert again.shards_written == 2  # both ablation shards (one per batch)
    fresh = tiny_stores.copy("gpt2", tmp_path / "fresh", **SETTINGS)  # one uninterrupted run
    for store in (legacy, fresh):
        assert verify(store).ok
    compact(legacy)
    got, want = (_neurons(s) for s in (legacy, fresh))
    assert got == want and len(got["neuron_totals"]) > 0


def _neurons(store) -> dict:
    ms = ModelStore(store / "tiny-gpt2")
    out = {}
    for table in ("neuron_effects", "neuron_totals"):
        t = files.read_parquet(ms.table_files(table))
        out[table] = sorted(tuple(r.values()) for r in t.to_pylist()) if t is not None else []
    return out
