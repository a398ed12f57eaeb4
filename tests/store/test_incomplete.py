"""An ingest that fails before its first commit leaves no model folder; `verify` flags any that remain."""

import shutil

import pytest
from click.testing import CliRunner

from tiny_models import ingest_tiny
from selfrepair.cli import main
from selfrepair.store import arrays, files
from selfrepair.store.model_store import ModelStore
from selfrepair.store.verify import verify
from selfrepair.store.writer import write_manifest


def _crash(*args, **kwargs):
    # The failure: a hook the engine expects is missing while writing arrays.
    raise KeyError("blocks.0.ln2.hook_scale")


def test_failure_before_first_commit_removes_the_folder_it_created(tiny_model_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(arrays, "write_region", _crash)
    with pytest.raises(KeyError, match="blocks.0.ln2.hook_scale"):
        ingest_tiny(tiny_model_dirs["gpt2"], tmp_path, ablations=("zero",))
    assert not (tmp_path / "tiny-gpt2").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_typed_failure_before_first_commit_one_line_and_no_folder(tiny_model_dirs, tmp_path, monkeypatch):
    from selfrepair.errors import StoreError

    def no_arrays(*args, **kwargs):
        raise StoreError(f"cannot write {tmp_path}/tiny-gpt2/activations.zarr: simulated")

    monkeypatch.setattr(arrays, "create_arrays", no_arrays)
    res = CliRunner().invoke(main, ["ingest", "--model", str(tiny_model_dirs["gpt2"]), "--store", str(tmp_path),
                                    "--tokens", "62", "--seq-len", "32", "--corpus", "embedded", "--quiet"])
    assert res.exit_code == 1
    assert res.output.splitlines() == [f"Error: cannot write {tmp_path}/tiny-gpt2/activations.zarr: simulated"]
    assert not (tmp_path / "tiny-gpt2").exists()


def test_failure_keeps_a_folder_that_was_there_before(tiny_model_dirs, tiny_stores, tmp_path, monkeypatch):
    tiny_stores.copy("gpt2", tmp_path, tokens=62, ablations=("zero",))
    shards = sorted(ModelStore(tmp_path / "tiny-gpt2").manifest().shards)
    monkeypatch.setattr(arrays, "write_region", _crash)
    with pytest.raises(KeyError):
        ingest_tiny(tiny_model_dirs["gpt2"], tmp_path, tokens=124, ablations=("zero",))  # extends: new shards
    assert sorted(ModelStore(tmp_path / "tiny-gpt2").manifest().shards) == shards
    assert all(ModelStore(tmp_path / "tiny-gpt2").table_files("tokens"))


def test_failure_after_a_commit_keeps_the_folder_for_resume(tiny_model_dirs, tmp_path, monkeypatch):
    real, calls = arrays.write_region, {"n": 0}

    def crash_in_second_shard(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:  # five arrays per clean shard: the second shard fails
            _crash()
        return real(*args, **kwargs)

    monkeypatch.setattr(arrays, "write_region", crash_in_second_shard)
    with pytest.raises(KeyError):
        ingest_tiny(tiny_model_dirs["gpt2"], tmp_path, ablations=("zero",))
    ms = ModelStore(tmp_path / "tiny-gpt2")
    assert sorted(ms.manifest().shards) == ["clean-00000000-00000004"]


def test_verify_reports_folder_without_manifest(tiny_stores, tmp_path):
    tiny_stores.copy("gpt2", tmp_path, tokens=62, ablations=("zero",))
    (tmp_path / "tiny-opt").mkdir()
    report = verify(tmp_path)
    assert not report.ok
    assert report.problems == {
        "tiny-gpt2": [],
        "tiny-opt": [f"incomplete ingest: {tmp_path / 'tiny-opt'} has no manifest.json "
                     "(re-run the ingest, or delete the folder)"],
    }
    res = CliRunner().invoke(main, ["verify", "--store", str(tmp_path)])
    assert res.exit_code == 1
    assert "tiny-opt: 1 problem(s)" in res.output.splitlines()
    assert res.output.splitlines()[-1] == f"Error: verify found 1 problem(s) in {tmp_path}"


def test_verify_reports_manifest_without_clean_shard(tiny_stores, tmp_path):
    tiny_stores.copy("gpt2", tmp_path / "good", tokens=62, ablations=("zero",))
    folder = tmp_path / "s" / "tiny-gpt2"
    shutil.copytree(tmp_path / "good" / "tiny-gpt2", folder)
    ms = ModelStore(folder)
    manifest = ms.manifest()
    for shard in manifest.shards.values():
        for entry in shard.files.values():
            files.remove_file(folder / entry.path)
    write_manifest(ms, manifest.to_json() | {"shards": {}})
    res = CliRunner().invoke(main, ["verify", "--store", str(tmp_path / "s")])
    assert res.exit_code == 1, res.output
    lines = res.output.splitlines()
    # Verify goes on after the finding (the arrays and derived table now lack their shards too).
    assert lines[0].startswith("tiny-gpt2: ") and lines[0].endswith(" problem(s)")
    assert f"  FAIL incomplete ingest: {folder} has no committed clean shard (re-run the ingest, or delete the folder)" in lines


def test_verify_of_an_empty_folder_is_a_problem_not_ok(tmp_path):
    (tmp_path / "tiny-phi").mkdir()
    report = verify(tmp_path)
    assert not report.ok and list(report.problems) == ["tiny-phi"]
