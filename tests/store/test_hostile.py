"""A damaged or hostile model folder: every command answers with one `Error:` line and changes nothing.

Paths named by the manifest or a commit record must stay inside the model folder (no
`..`, no absolute path, no symlink out); a manifest or record that is empty, truncated,
binary, of the wrong JSON type or missing keys is refused, as is an unknown schema_version.
"""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from selfrepair.cli import main
from tiny_models import read_manifest_json, small_store_ingest, tree_hashes  # `good_store` (tests/conftest.py): a small tiny-GPT-2 store to damage copies of

MODEL = "tiny-gpt2"


_manifest = read_manifest_json


def _set_manifest(m: Path, obj) -> None:
    (m / "manifest.json").write_text(json.dumps(obj))


def _first_file(man: dict) -> dict:
    return man["shards"][min(s for s in man["shards"] if s.startswith("clean"))]["files"]["tokens"]


def _repath(path: str):
    def damage(m: Path) -> None:
        man = _manifest(m)
        _first_file(man)["path"] = path
        _set_manifest(m, man)
    return damage


def _symlink_out(m: Path) -> None:
    # A committed file replaced by a link to a file outside the store (same bytes, so the
    # checksum even matches): only the path check can refuse it.
    target = m.parent.parent / "outside.parquet"
    f = m / _first_file(_manifest(m))["path"]
    shutil.copy(f, target)
    f.unlink()
    f.symlink_to(target)


def _log(m: Path) -> Path:
    return m / "commits" / f"{_manifest(m)['log']['generation']:08d}.jsonl"


def _append(line: bytes):
    def damage(m: Path) -> None:
        with open(_log(m), "ab") as f:
            f.write(line + b"\n")
    return damage


def _edit(fn):
    def damage(m: Path) -> None:
        man = _manifest(m)
        fn(man)
        _set_manifest(m, man)
    return damage


_RECORD_OUT = json.dumps({"seq": 0, "op": "shard", "id": "evil", "supersedes": [], "entry": {
    "phase": "clean", "rows": [0, 1], "files": {"tokens": {"path": "../../outside.parquet", "rows": 1, "bytes": 1,
                                                           "sha256": "0"}}}}).encode()

CASES = {
    "manifest empty": (lambda m: (m / "manifest.json").write_bytes(b""), "is empty"),
    "manifest truncated": (lambda m: (m / "manifest.json").write_bytes((m / "manifest.json").read_bytes()[:200]),
                           "not valid JSON"),
    "manifest a list": (lambda m: _set_manifest(m, [1, 2, 3]), "is a JSON list, not an object"),
    "manifest binary": (lambda m: (m / "manifest.json").write_bytes(bytes(range(256)) * 4), "not valid JSON"),
    "manifest without shards": (_edit(lambda man: man.pop("shards")), "lacks the key 'shards'"),
    "shards of the wrong type": (_edit(lambda man: man.update(shards=[])), "'shards' has the wrong type"),
    "schema_version 99": (_edit(lambda man: man.update(schema_version=99)), "schema_version 99 is not one"),
    "path with ..": (_repath("../../../etc/passwd"), "leads outside the model folder"),
    "absolute path": (_repath("/etc/passwd"), "leads outside the model folder"),
    "symlink out": (_symlink_out, "leads outside the model folder (through a symlink)"),
    "record not JSON": (_append(b"garbage {"), "commit record 0 of"),
    "record a list": (_append(b"[1]"), "is a JSON list, not an object"),
    "record without keys": (_append(b'{"seq": 0, "op": "shard"}'), "lacks the key"),
    "record with a path out": (_append(_RECORD_OUT), "leads outside the model folder"),
    "commit log missing": (lambda m: _log(m).unlink(), "commit log"),
    "derived path out": (_edit(lambda man: man["derived"]["head_top_tokens"].update(path="../../outside/victim.txt")),
                         "leads outside the model folder"),
}


_snapshot = tree_hashes


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_or_hostile_store_gets_one_error_line(good_store, tiny_model_dirs, tmp_path, case):
    damage, message = CASES[case]
    store = tmp_path / "store"
    shutil.copytree(good_store, store, symlinks=True)
    damage(store / MODEL)
    before = _snapshot(tmp_path)
    ingest = small_store_ingest(tiny_model_dirs["gpt2"])
    for command in (["sql", "SELECT count(*) FROM tokens"], ["query", "layer_summary"], ["verify"], ingest):
        res = CliRunner().invoke(main, [*command, "--store", str(store)])
        errors = [line for line in res.output.splitlines() if line.startswith("Error")]
        assert res.exit_code == 1, (command[0], res.output)
        assert len(errors) == 1 and "Traceback" not in res.output, (command[0], res.output)
        assert message in errors[0], (command[0], errors[0])
        assert _snapshot(tmp_path) == before, command[0]


def test_cleanup_never_deletes_outside_the_model_folder(good_store, tmp_path):
    store, outside = tmp_path / "store", tmp_path / "outside"
    shutil.copytree(good_store, store, symlinks=True)
    outside.mkdir()
    (outside / "keep.parquet").write_bytes(b"precious")
    (outside / "sub").mkdir()
    (outside / "sub" / "keep2.parquet").write_bytes(b"precious")
    m = store / MODEL
    (m / "tables" / "tokens" / "stray.parquet").symlink_to(outside / "keep.parquet")  # an orphan link
    (m / "tables" / "linked").symlink_to(outside / "sub")  # a folder link: never walked
    from selfrepair.store.model_store import ModelStore
    from selfrepair.store.writer import Writer

    with Writer.open(ModelStore(m)) as w:
        removed = w.clean_orphans()
    assert m / "tables" / "tokens" / "stray.parquet" in removed  # the link itself, inside the folder
    assert (outside / "keep.parquet").read_bytes() == b"precious"
    assert (outside / "sub" / "keep2.parquet").read_bytes() == b"precious"
