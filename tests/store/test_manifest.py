"""The typed manifest: every field out of bounds, every hostile metadata file, is one `Error:` line.

Each case damages a copy of one small ingested store (the manifest checkpoint, the commit
log, or the files where they belong) and runs `sql`, `info`, `verify` and `ingest` on it:
each must exit non-zero with exactly one `Error:` line naming the file, the field and the
value, no traceback, and leave every file of the store unchanged (hashed before and after).
A second table holds stores whose fields are in bounds but disagree with the stored data:
`verify` reports them and fails.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from tiny_models import read_manifest_json, small_store_ingest, tree_hashes  # `good_store` (tests/conftest.py): a small tiny-GPT-2 store to damage copies of
from selfrepair.cli import main
from selfrepair.store import jsonread
from selfrepair.store.bounds import FIELD_BOUNDS, MAX_LAYERS, MAX_ROWS, MAX_TOKENS

MODEL = "tiny-gpt2"


# -- damage ----------------------------------------------------------------------------------
_manifest = read_manifest_json


def _edit(fn):
    def damage(m: Path) -> None:
        man = _manifest(m)
        fn(man)
        (m / "manifest.json").write_text(json.dumps(man))
    return damage


def _clean(man: dict) -> dict:
    return man["shards"][min(s for s in man["shards"] if s.startswith("clean"))]


def _abl(man: dict) -> dict:
    return man["shards"][min(s for s in man["shards"] if s.startswith("abl"))]


def _log(m: Path) -> Path:
    return m / "commits" / f"{_manifest(m)['log']['generation']:08d}.jsonl"


def _record(**record):
    def damage(m: Path) -> None:
        with open(_log(m), "ab") as f:
            f.write(json.dumps({"seq": 0, **record}).encode() + b"\n")
    return damage


def _replace_log(make):
    def damage(m: Path) -> None:
        log = _log(m)
        log.unlink()
        make(log)
    return damage


def _sparse(path: Path, size: int) -> None:
    # A file of `size` zero bytes that takes no disk: only a bounded read can refuse it cheaply.
    with open(path, "wb") as f:
        f.truncate(size)


def _symlink_manifest_out(m: Path) -> None:
    outside = m.parent.parent / "outside-manifest.json"
    shutil.copy(m / "manifest.json", outside)
    (m / "manifest.json").unlink()
    (m / "manifest.json").symlink_to(outside)


def _symlink_commits_out(m: Path) -> None:
    outside = m.parent.parent / "outside-commits"
    shutil.copytree(m / "commits", outside)
    shutil.rmtree(m / "commits")
    (m / "commits").symlink_to(outside)


def _fifo_manifest(m: Path) -> None:
    (m / "manifest.json").unlink()
    os.mkfifo(m / "manifest.json")


def _nested(m: Path) -> None:
    (m / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)


def _deep_shard(man: dict) -> None:
    deep = {}
    for _ in range(jsonread.MAX_DEPTH):
        deep = {"x": deep}
    _clean(man)["extra"] = deep


def _tokens_as_derived(man: dict) -> None:
    man["derived"]["head_top_tokens"]["path"] = _clean(man)["files"]["tokens"]["path"]


HUGE = 10**30
CASES = {
    # field bounds in the checkpoint
    "n_tokens -5": (_edit(lambda man: man.update(n_tokens=-5)), f"n_tokens is -5, outside [0, {MAX_TOKENS}]"),
    "n_tokens 10^30": (_edit(lambda man: man.update(n_tokens=HUGE)), f"n_tokens is {HUGE}"),
    "n_rows -1": (_edit(lambda man: man.update(n_rows=-1)), f"n_rows is -1, outside [0, {MAX_ROWS}]"),
    "seq_len a string": (_edit(lambda man: man.update(seq_len="32")), "'seq_len' has the wrong type"),
    "n_tokens true": (_edit(lambda man: man.update(n_tokens=True)), "'n_tokens' has the wrong type"),
    "shard rows [5000, 10^30)": (_edit(lambda man: _clean(man).update(rows=[5000, HUGE])),
                                 f"rows [5000, {HUGE}] is not a range inside [0, {MAX_ROWS}]"),
    "shard rows reversed": (_edit(lambda man: _clean(man).update(rows=[4, 2])), "rows [4, 2] is not a range"),
    "shard tokens negative": (_edit(lambda man: _clean(man).update(tokens=[-3, 10])), "tokens [-3, 10] is not a range"),
    "unknown phase": (_edit(lambda man: _clean(man).update(phase="bogus")), "phase is 'bogus', not one of"),
    "unknown ablation": (_edit(lambda man: _abl(man).update(ablation="bogus")), "ablation is 'bogus', not one of"),
    "sample 99999": (_edit(lambda man: _abl(man).update(sample=99999)), "sample is 99999, outside [0, 32767]"),
    "file rows -1": (_edit(lambda man: _clean(man)["files"]["tokens"].update(rows=-1)), "rows is -1, outside"),
    "file bytes 2^60": (_edit(lambda man: _clean(man)["files"]["tokens"].update(bytes=1 << 60)),
                        f"bytes is {1 << 60}, outside"),
    "file of another table": (_edit(lambda man: _clean(man)["files"]["tokens"].update(
        path=_clean(man)["files"]["head_effects"]["path"])), "is not a file of table tokens"),
    "chunk outside activations.zarr": (_edit(lambda man: _clean(man)["chunks"].update({"tables/x": None})),
                                       "names 'tables/x', not a file under activations.zarr/"),
    "units outside the model": (_edit(lambda man: _abl(man).update(units="L50H1")),
                                "units 'L50H1' do not fit the model's 2 layers × 4 heads"),
    "condition outside the model": (_edit(lambda man: _abl(man).update(condition="MLP9")),
                                    "condition 'MLP9' does not fit the model's 2 layers × 4 heads"),
    # An entry written before units names its heads alone.
    "heads outside the model": (_edit(lambda man: (_abl(man).pop("units"), _abl(man).pop("condition", None),
                                                   _abl(man).update(heads="L50H1"))),
                                "heads 'L50H1' name heads outside the model's 2 layers × 4 heads"),
    "n_layers 5000": (_edit(lambda man: man["model"].update(n_layers=5000)),
                      f"n_layers is 5000, outside [1, {MAX_LAYERS}]"),
    "n_heads 0": (_edit(lambda man: man["model"].update(n_heads=0)), "n_heads is 0, outside [1, 1024]"),
    "model 99 x 99": (_edit(lambda man: man["model"].update(n_layers=99, n_heads=99)),
                      "model.n_layers is 99, but array"),
    "derived entry at a tokens shard": (_edit(_tokens_as_derived), "is not a file of table head_top_tokens"),
    "derived table tokens": (_edit(lambda man: man["derived"].update(tokens=_clean(man)["files"]["tokens"])),
                             "unknown derived table 'tokens'"),
    "derived top_p 5": (_edit(lambda man: man["derived"]["head_top_tokens"].update(top_p=5)),
                        "top_p is 5, outside (0, 1]"),
    "config top_p 0": (_edit(lambda man: man["config"].update(top_p=0)), "config: top_p is 0, outside (0, 1]"),
    "unknown ablation kind": (_edit(lambda man: man.update(ablations=["zero", "bogus"])), "ablations holds 'bogus'"),
    "resample samples 0": (_edit(lambda man: man["resample"].update(samples=0)), "samples is 0, outside"),
    "array shape negative": (_edit(lambda man: man["arrays"]["z"].update(shape=[62, 2, -4, 8])),
                             "shape [62, 2, -4, 8] is not a list of sizes"),
    "log generation -1": (_edit(lambda man: man["log"].update(generation=-1)), "generation is -1, outside"),
    "JSON nested 100,000 deep": (_nested, f"nests JSON more than {jsonread.MAX_DEPTH} levels deep"),
    "JSON nested 33 deep": (_edit(_deep_shard), f"nests JSON more than {jsonread.MAX_DEPTH} levels deep"),
    # commit records
    "record sets n_tokens -5": (_record(op="set", values={"n_tokens": -5}),
                                "commit record 0 of", ),
    "record sets model 99 x 99": (_record(op="set", values={"model": {"n_layers": 99, "n_heads": 99}}),
                                  "a set record may not replace"),
    "record sets n_layers via arrays": (_record(op="set", values={"arrays": {"z": {
        "dims": ["token_index", "layer", "head", "d_head"], "dtype": "float16", "shape": [62, 99, 99, 8]}}}),
        "model.n_layers is 2, but array z has 99 along layer"),
    "record with unknown op": (_record(op="drop", table="tokens"), "unknown op 'drop'"),
    "record derives tokens": (_record(op="derived", table="tokens", entry={
        "path": "tables/tokens/x.parquet", "rows": 1, "bytes": 1, "sha256": "0"}), "unknown derived table 'tokens'"),
    "record shard rows [5000, 10^30)": (_record(op="shard", id="evil", supersedes=[], entry={
        "phase": "clean", "rows": [5000, HUGE], "files": {}}), "rows [5000, "),
    # metadata files that are not plain, bounded, inside files
    "manifest a FIFO": (_fifo_manifest, "is not a regular file"),
    "manifest symlinked out": (_symlink_manifest_out, "is a symlink"),
    "manifest of 257 MiB": (lambda m: _sparse(m / "manifest.json", jsonread.MANIFEST_MAX_BYTES + 1),
                            f"over the limit of {jsonread.MANIFEST_MAX_BYTES}"),
    "commit log symlinked to /dev/zero": (_replace_log(lambda log: log.symlink_to("/dev/zero")), "is a symlink"),
    "commit log a FIFO": (_replace_log(os.mkfifo), "is not a regular file"),
    "commits folder symlinked out": (_symlink_commits_out, "commits must lie inside it"),
    "a 300 MB commit record": (_replace_log(lambda log: _sparse(log, 300 * jsonread.MIB)),
                               f"a record has more than {jsonread.RECORD_MAX_BYTES} bytes"),
    "commit log of 600 MB": (_replace_log(lambda log: _sparse(log, 600 * jsonread.MIB)),
                             f"over the limit of {jsonread.LOG_MAX_BYTES}"),
}
# The record's message names the file, the field and the value too.
CASES["record sets n_tokens -5"] = (CASES["record sets n_tokens -5"][0], f"n_tokens is -5, outside [0, {MAX_TOKENS}]")


_snapshot = tree_hashes


def _commands(model_dir: Path) -> list[list[str]]:
    return [["sql", "SELECT count(*) FROM tokens"], ["info"], ["verify"], small_store_ingest(model_dir)]


@pytest.mark.parametrize("case", list(CASES))
def test_out_of_bounds_is_one_error_line_from_every_command(good_store, tiny_model_dirs, tmp_path, case):
    damage, message = CASES[case]
    store = tmp_path / "store"
    shutil.copytree(good_store, store, symlinks=True)
    damage(store / MODEL)
    before = _snapshot(tmp_path)
    for command in _commands(tiny_model_dirs["gpt2"]):
        res = CliRunner().invoke(main, [*command, "--store", str(store)])
        errors = [line for line in res.output.splitlines() if line.startswith("Error")]
        assert res.exit_code == 1, (command[0], res.output, res.exception)
        assert len(errors) == 1 and "Traceback" not in res.output, (command[0], res.output)
        assert message in errors[0], (command[0], errors[0])
        if command[0] != "ingest":  # nothing else printed: `info` shows no "-5 tokens"
            assert res.output == errors[0] + "\n", (command[0], res.output)
        assert _snapshot(tmp_path) == before, command[0]


# In bounds, but not what the store holds: `verify` fails with a line saying so.
VERIFY_CASES = {
    # Without the arrays (an ingest with --activations none) only the clean rows can contradict the model.
    "model 99 x 99, no arrays": (_edit(lambda man: (man.pop("arrays"), man["model"].update(n_layers=99, n_heads=99))),
                                 "holds 8 heads, not the 9801 of the manifest's model"),
    "n_tokens not n_rows x (seq_len - 1)": (_edit(lambda man: man.update(n_tokens=61)),
                                            "counts 61 tokens, but 2 rows of 31 predictions make 62"),
    "a shard claiming rows [5000, 6000)": (_edit(lambda man: _abl(man).update(rows=[5000, 6000])),
                                           "outside its rows 5000..6000"),
    "clean rows beyond n_rows": (_edit(lambda man: _clean(man).update(rows=[0, 5000])),
                                 "clean shards claim rows up to 5000, beyond the manifest's 2 rows"),
}


@pytest.mark.parametrize("case", list(VERIFY_CASES))
def test_verify_fails_on_fields_the_data_contradicts(good_store, tmp_path, case):
    damage, message = VERIFY_CASES[case]
    store = tmp_path / "store"
    shutil.copytree(good_store, store, symlinks=True)
    damage(store / MODEL)
    before = _snapshot(tmp_path)
    res = CliRunner().invoke(main, ["verify", "--store", str(store)])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert any(message in line for line in res.output.splitlines()), res.output
    res = CliRunner().invoke(main, ["sql", "SELECT count(*) AS n FROM tokens", "--store", str(store)])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output  # no IndexError anywhere
    assert _snapshot(tmp_path) == before


def test_the_good_store_reads_and_verifies(good_store):
    res = CliRunner().invoke(main, ["verify", "--store", str(good_store)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["info", "--store", str(good_store)])
    assert res.exit_code == 0 and "62 tokens" in res.output, res.output


def test_the_writer_keeps_the_on_disk_format(good_store, tmp_path):
    from selfrepair.store.model_store import ModelStore
    from selfrepair.store.writer import Writer

    store = tmp_path / "store"
    shutil.copytree(good_store, store)
    before = _manifest(store / MODEL)
    with Writer.open(ModelStore(store / MODEL)) as w:
        w.set(n_rows=before["n_rows"])  # one record, then a checkpoint on close
    after = _manifest(store / MODEL)
    assert after == before | {"log": {"generation": before["log"]["generation"] + 1}}


def test_every_bound_is_listed():
    assert all(isinstance(t, str) and isinstance(b, str) for t, b in FIELD_BOUNDS.values())


def test_a_schema_1_store_without_later_keys_still_reads(good_store, tmp_path):
    # Schema 1: no commit log, every commit rewrote the manifest; older still: no ablations,
    # resample or top_token_rule keys. The typed parse supplies their defaults.
    store = tmp_path / "store"
    shutil.copytree(good_store, store)
    m = store / MODEL
    man = _manifest(m)
    for key in ("log", "ablations", "resample", "top_token_rule"):
        man.pop(key)
    (m / "manifest.json").write_text(json.dumps(man | {"schema_version": 1}))
    shutil.rmtree(m / "commits")
    res = CliRunner().invoke(main, ["verify", "--store", str(store)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["sql", "SELECT count(*) AS n FROM tokens", "--store", str(store)])
    assert res.exit_code == 0 and "62" in res.output, res.output
