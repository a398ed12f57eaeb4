"""`selfrepair compact`: same rows, fewer sorted files, crash-safe, and resume/extension/verify still work."""

from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from tiny_models import ingest_tiny
from selfrepair import Store
from selfrepair.cli import main
from selfrepair.store import compact as compact_mod
from selfrepair.store.compact import compact
from selfrepair.store.model_store import ModelStore
from selfrepair.store.schema import TABLES
from selfrepair.store.verify import verify

SMALL = dict(seq_len=32, batch_size=2, top_p=0.05, neurons_top_k=3)
MODEL = "tiny-gpt2"


def _tables(store: Path) -> dict[str, pl.DataFrame]:
    s = Store.open(store)
    try:
        return {name: s.sql(f"SELECT * FROM {name}").sort(list(t.key)) for name, t in TABLES.items()}
    finally:
        s.close()


def _assert_same_sets(got: dict, want: dict) -> None:
    for name in TABLES:
        assert got[name].height == want[name].height, name
        # Rows as sets: sorted by the whole row, compared exactly (compaction copies values).
        cols = got[name].columns
        assert got[name].sort(cols).equals(want[name].sort(cols)), name


def _n_files(store: Path) -> int:
    m = ModelStore(store / MODEL).manifest()
    return sum(len(e.files) for e in m.shards.values()) + sum(len(v) for v in m.compacted.values())


@pytest.fixture
def ingested(tiny_stores, tmp_path) -> Path:
    """A store of this test's own, copied from one ingest shared by the session (compaction rewrites it)."""
    return tiny_stores.copy("gpt2", tmp_path / "store", tokens=124, ablations=("resample", "zero"), **SMALL)


def test_compaction_keeps_every_row_and_sorts_each_file(ingested):
    before, n_before = _tables(ingested), _n_files(ingested)
    (result,) = compact(ingested)
    assert result.shards > 0 and result.files_after == 10  # every shard table, one file each
    assert _n_files(ingested) == 10 < n_before
    _assert_same_sets(_tables(ingested), before)
    manifest = ModelStore(ingested / MODEL).manifest()
    for table, entries in manifest.compacted.items():
        (entry,) = entries
        frame = pl.read_parquet(ingested / MODEL / entry.path)
        key = list(TABLES[table].key)
        assert frame.select(key).equals(frame.select(key).sort(key)), table
    # Every shard keeps its units (what store/plan.py reads) and names the tables moved.
    assert all(not e.files and e.compacted for e in manifest.shards.values())
    assert verify(ingested).ok
    # Nothing of the old shard files is left on disk.
    on_disk = {p.name for p in (ingested / MODEL / "tables").rglob("*.parquet")}
    assert all(n.startswith("compact-") or n.startswith("derived-") for n in on_disk), on_disk


def test_resume_and_extension_after_compaction_do_only_missing_units(tiny_model_dirs, tmp_path):
    d = tiny_model_dirs["gpt2"]
    base = dict(SMALL, tokens=124, ablations=("zero",))
    ingest_tiny(d, tmp_path / "grown", heads="L0", **base)
    compact(tmp_path / "grown")
    assert ingest_tiny(d, tmp_path / "grown", heads="L0", **base).shards_written == 0  # resume: all stored
    grown = ingest_tiny(d, tmp_path / "grown", heads="all", **base)
    assert grown.shards_written == 2  # one shard of the missing heads per batch, no clean shard
    ingest_tiny(d, tmp_path / "once", heads="all", **base)
    _assert_same_sets(_tables(tmp_path / "grown"), _tables(tmp_path / "once"))
    assert verify(tmp_path / "grown").ok
    compact(tmp_path / "grown")  # a second compaction folds the new shards into the compacted files
    _assert_same_sets(_tables(tmp_path / "grown"), _tables(tmp_path / "once"))
    assert verify(tmp_path / "grown").ok


def test_more_tokens_after_compaction_redo_compacted_batches_without_duplicates(tiny_model_dirs, tmp_path):
    d = tiny_model_dirs["gpt2"]
    settings = dict(SMALL, ablations=("resample", "zero"), heads="L1")
    ingest_tiny(d, tmp_path / "grown", tokens=93, **settings)  # batches [0, 2) and partial [2, 3)
    (result,) = compact(tmp_path / "grown")
    assert result.shards == 3  # batch [0, 2): clean, resample, zero; the partial batch stays as shards
    # [2, 3) grows to [2, 4); [0, 2)'s resample pairs pointed into it, so its compacted rows are redone.
    ingest_tiny(d, tmp_path / "grown", tokens=124, **settings)
    ingest_tiny(d, tmp_path / "once", tokens=124, **settings)
    got, want = _tables(tmp_path / "grown"), _tables(tmp_path / "once")
    for name in ("tokens", "head_effects", "mlp_effects", "ablation_effects", "resample_sources"):
        key = list(TABLES[name].key)
        assert got[name].select(key).is_duplicated().sum() == 0, name
        assert got[name].select(key).equals(want[name].select(key)), name
    assert verify(tmp_path / "grown").ok


def test_a_kill_during_compaction_leaves_the_old_store_readable(ingested, monkeypatch):
    before = _tables(ingested)
    real = compact_mod.write_sorted
    calls = []

    def dies_midway(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 4:  # three tables' compacted files already written
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(compact_mod, "write_sorted", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        compact(ingested)
    _assert_same_sets(_tables(ingested), before)
    assert verify(ingested).ok
    assert not ModelStore(ingested / MODEL).manifest().compacted
    monkeypatch.setattr(compact_mod, "write_sorted", real)
    (result,) = compact(ingested)  # the next compaction completes and removes the leftovers
    assert result.files_after == 10
    _assert_same_sets(_tables(ingested), before)
    assert verify(ingested).ok
    assert len(list((ingested / MODEL / "tables").rglob("compact-*.parquet"))) == 10


def test_a_kill_at_the_commit_leaves_the_old_store_readable(ingested, monkeypatch):
    from selfrepair.store.writer import Writer

    before = _tables(ingested)

    def dies(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Writer, "commit_compaction", dies)
    with pytest.raises(KeyboardInterrupt):
        compact(ingested)
    _assert_same_sets(_tables(ingested), before)
    assert verify(ingested).ok
    monkeypatch.undo()
    compact(ingested)
    _assert_same_sets(_tables(ingested), before)


def test_verify_finds_a_compacted_file_with_duplicate_keys(ingested):
    from selfrepair.store import files

    compact(ingested)
    ms = ModelStore(ingested / MODEL)
    entry = dict(ms.manifest().compacted["head_effects"][0].raw)
    path = ms.path / entry["path"]
    frame = pl.read_parquet(path)
    doubled = pl.concat([frame, frame.head(1)]).sort(list(TABLES["head_effects"].key)).to_arrow()
    size, digest = files.write_parquet(path, doubled.cast(TABLES["head_effects"].arrow_schema))
    # Re-point the checkpoint at the damaged file, so only the key check can object.
    m = files.read_json(ms.manifest_path)
    m.setdefault("compacted", ms.manifest().to_json()["compacted"])["head_effects"] = [
        entry | {"rows": doubled.num_rows, "bytes": size, "sha256": digest}]
    files.atomic_write_json(ms.manifest_path, m)
    report = verify(ingested)
    assert not report.ok
    assert any("not strictly sorted" in p for p in report.problems[MODEL]), report.problems


def test_cli_compact(ingested, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["compact", "--store", str(ingested)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{MODEL}: ") and "-> 10 sorted files" in result.output
    again = runner.invoke(main, ["compact", "--store", str(ingested)])
    assert again.exit_code == 0 and again.output == f"{MODEL}: nothing to compact\n"
    missing = runner.invoke(main, ["compact", "--store", str(tmp_path / "nope")])
    assert missing.exit_code == 1
    assert missing.output == f"Error: no selfrepair store at {tmp_path / 'nope'}\n"
