"""The red team's cases (issue 13): hostile or careless input gets one `Error:` line or the right answer.

Each case runs one command against a copy of a good store and asserts its exit code, its
one line (the single `Error:` line, or a line of the right answer) and, unless the case is
an ingest that is meant to write, that no file of any store changed. The cases that need
an ingest to finish what an earlier one left follow the table.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
from click.testing import CliRunner

import tiny_models
from tiny_models import ingest_tiny, tree_hashes
from selfrepair.cli import main

MODEL = "tiny-gpt2"
ARGS = dict(tokens=62, seq_len=32, batch_size=2, ablations=("zero",), heads="L1", top_p=0.05, neurons_top_k=2)
INGEST = ["--tokens", "62", "--seq-len", "32", "--batch-size", "2", "--ablations", "zero", "--heads", "L1",
          "--top-p", "0.05", "--neurons-top-k", "2", "--quiet"]
SELF_JOIN = "SELECT a.token_index, b.token_index FROM tokens a JOIN tokens b USING (model, token_index) ORDER BY 1 LIMIT 2"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_models.save("gpt2", tmp_path_factory.mktemp("model") / MODEL)


@pytest.fixture(scope="module")
def good_store(model_dir, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("good")
    ingest_tiny(model_dir, store, **ARGS)
    return store


@dataclass
class Case:
    """One hostile or odd input.

    Args:
        args: the command line, from the context (`c.store`, `c.model`, `c.tmp`, `c.m` the model folder).
        code: the exit code.
        line: text the single `Error:` line (or, for exit 0, the output) must contain.
        setup: prepares files before the command runs.
        env: extra environment variables.
        patch: monkeypatches (e.g. a full disk).
        writes: the command may change the store (an ingest that succeeds).
        stdin: opens the command's standard input (e.g. /dev/zero), from the context.
    """

    args: Callable
    code: int
    line: str
    setup: Callable | None = None
    env: dict = field(default_factory=dict)
    patch: Callable | None = None
    writes: bool = False
    stdin: Callable | None = None


def sql(text: str, *extra: str):
    return lambda c: ["sql", text, "--store", str(c.store), *extra]


def ingest(*extra: str, store: str | None = None, model: str | None = None):
    return lambda c: ["ingest", "--model", str(c.tmp / model) if model else str(c.model),
                      "--store", str(c.tmp / store) if store else str(c.store), *INGEST, *extra]


def _write(name: str, data: bytes):
    return lambda c: (c.tmp / name).write_bytes(data)


def _int_text_parquet(c) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), c.tmp / "ints.parquet")


def _model_copy(name: str, damage):
    def setup(c) -> None:
        shutil.copytree(c.model, c.tmp / name)
        damage(c.tmp / name)
    return setup


def _truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size * 9 // 10])


def _drop_tokenizer(folder: Path) -> None:
    for p in folder.iterdir():
        if p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            p.unlink()


def _derived_outside(c) -> None:
    (c.tmp / "outside").mkdir()
    (c.tmp / "outside" / "victim.txt").write_text("precious")
    man = json.loads((c.m / "manifest.json").read_text())
    man["derived"]["head_top_tokens"]["path"] = "../../outside/victim.txt"
    (c.m / "manifest.json").write_text(json.dumps(man))


def _symlinked(name: str):
    """Move one of the model folder's own folders outside and leave a symlink to it."""
    def setup(c) -> None:
        (c.tmp / "outside").mkdir()
        shutil.move(c.m / name, c.tmp / "outside" / name)
        (c.m / name).symlink_to(c.tmp / "outside" / name)
    return setup


def _zarr_json(rel: str):
    return lambda c: (c.m / "activations.zarr" / rel / "zarr.json").write_bytes(b'{"zarr_format": 3, "no')


def _full_disk(monkeypatch) -> None:
    from zarr.storage import LocalStore

    real_set = LocalStore.set

    async def no_space_for_chunks(self, key, value, *args, **kwargs):
        if key.startswith("c/"):  # an activation chunk (keys below the array; the weights are written earlier)
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "set", no_space_for_chunks)


def _neighbours(name: str, other: str, model_names=False):
    """A copy of the good store named `name` (a pattern) beside a copy named `other` that it matches."""
    def setup(c) -> None:
        if model_names:  # two model folders in one store root
            shutil.copytree(c.good / MODEL, c.tmp / "root" / name)
            shutil.copytree(c.good / MODEL, c.tmp / "root" / other)
        else:
            shutil.copytree(c.good, c.tmp / name)
            shutil.copytree(c.good, c.tmp / other)
    return setup


def _link_to_manifest(c) -> None:
    (c.tmp / "out.json").symlink_to(c.m / "manifest.json")


# -- issue 18: nothing followed out of a store, nothing outside written through it ------------------
def _lock_linked(target: str):
    """The model folder's `.writer.lock` replaced by a symlink to `target` under tmp (maybe dangling)."""
    def setup(c) -> None:
        (c.tmp / "outside").mkdir()
        if not target.endswith("new.txt"):
            (c.tmp / target).write_text("precious")
        (c.m / ".writer.lock").unlink()
        (c.m / ".writer.lock").symlink_to(c.tmp / target)
    return setup


def _lock_fifo(c) -> None:
    (c.m / ".writer.lock").unlink()
    os.mkfifo(c.m / ".writer.lock")


def _first_shard(c, table: str = "tokens") -> Path:
    return sorted((c.m / "tables" / table).glob("*.parquet"))[0]


def _shard_fifo(c) -> None:
    path = _first_shard(c)
    path.unlink()
    os.mkfifo(path)


def _shard_linked(c) -> None:
    path = _first_shard(c)
    (c.tmp / "outside").mkdir()
    shutil.move(path, c.tmp / "outside" / path.name)
    path.symlink_to(c.tmp / "outside" / path.name)


def _model_linked(c) -> None:
    """The model folder lives outside the store root; the root holds a symlink to it."""
    (c.tmp / "outside").mkdir()
    shutil.move(c.m, c.tmp / "outside" / MODEL)
    c.m.symlink_to(c.tmp / "outside" / MODEL)


def _array_linked(c) -> None:
    (c.tmp / "outside").mkdir()
    shutil.move(c.m / "activations.zarr" / "z", c.tmp / "outside" / "z")
    (c.m / "activations.zarr" / "z").symlink_to(c.tmp / "outside" / "z")


def _chunk(c) -> Path:
    return next(p for p in sorted((c.m / "activations.zarr" / "z" / "c").rglob("*")) if p.is_file())


def _chunk_linked(c) -> None:
    path = _chunk(c)
    (c.tmp / "outside").mkdir()
    shutil.move(path, c.tmp / "outside" / "chunk")
    path.symlink_to(c.tmp / "outside" / "chunk")


def _chunk_fifo(c) -> None:
    path = _chunk(c)
    path.unlink()
    os.mkfifo(path)


def _zarr_shape(n: int):
    def setup(c) -> None:
        meta = c.m / "activations.zarr" / "z" / "zarr.json"
        doc = json.loads(meta.read_text())
        doc["shape"][0] = n
        meta.write_text(json.dumps(doc))
    return setup


def _zarr_chunk(n: int):
    def setup(c) -> None:
        meta = c.m / "activations.zarr" / "z" / "zarr.json"
        doc = json.loads(meta.read_text())
        doc["chunk_grid"]["configuration"]["chunk_shape"][0] = n
        meta.write_text(json.dumps(doc))
    return setup


def _zarr_json_padded(c) -> None:
    meta = c.m / "activations.zarr" / "z" / "zarr.json"
    meta.write_bytes(meta.read_bytes() + b" " * (2 << 20))


def _opt_without_final_norm(c) -> None:
    import tiny_families

    folder = tiny_families.save("opt", c.tmp / "opt-nofinal", n_layers=2)
    config = json.loads((folder / "config.json").read_text())
    config["_remove_final_layer_norm"] = True
    (folder / "config.json").write_text(json.dumps(config))


def _other_store(c) -> None:
    shutil.copytree(c.good, c.tmp / "other")


def verify_store(c):
    return ["verify", "--store", str(c.store)]


COUNT = "SELECT count(*) AS n FROM tokens"

CASES = {
    # -- a read-only command never changes a file inside a store ---------------------------
    "--output a committed shard file": Case(
        lambda c: ["sql", "SELECT * FROM tokens", "--format", "parquet", "--store", str(c.store), "--output",
                   str(next((c.m / "tables" / "tokens").glob("*.parquet")))], 1, "refusing to write"),
    "--output the manifest": Case(
        lambda c: ["sql", "SELECT 1", "--store", str(c.store), "--output", str(c.m / "manifest.json")], 1,
        "lies inside the store"),
    "--output through a symlink to the manifest": Case(
        lambda c: ["sql", "SELECT 1", "--store", str(c.store), "--output", str(c.tmp / "out.json")], 1,
        "refusing to write", setup=_link_to_manifest),
    "--output inside another store's model folder": Case(
        lambda c: ["query", "layer_summary", "-p", "ablation=zero", "--format", "csv", "--store", str(c.store),
                   "--output", str(c.tmp / "other" / MODEL / "tables" / "x.csv")], 1, "inside the model folder",
        setup=lambda c: shutil.copytree(c.good, c.tmp / "other")),
    "export into the store": Case(
        lambda c: ["export", "ln_share", "-p", "ablation=zero", "--format", "latex", "--store", str(c.store), "--output",
                   str(c.store / "t.tex")], 1, "lies inside the store"),
    "report into a model folder": Case(
        lambda c: ["report", "--store", str(c.store), "--output", str(c.m / "report")], 1, "refusing to write"),
    # -- sql: the right answer --------------------------------------------------------------
    "duplicate column names (self-join)": Case(sql(SELF_JOIN, "--format", "csv"), 0, "token_index,token_index_1"),
    "INTERVAL as text": Case(sql("SELECT INTERVAL 3 DAY AS i", "--format", "csv"), 0, "3 days"),
    "UNION as text": Case(sql("SELECT union_value(k := 7) AS u", "--format", "json"), 0, '"u":"7"'),
    "infinite TIMESTAMP as text": Case(sql("SELECT 'infinity'::TIMESTAMP AS t, '-infinity'::DATE AS d"), 0,
                                       "infinity  -infinity"),
    "nested values in CSV": Case(sql("SELECT [1, 2] AS l", "--format", "csv"), 0, '"[1, 2]"'),
    "query text starting with a comment": Case(sql("-- Title\nSELECT 42 AS answer", "--format", "csv"), 0,
                                               "answer\n42"),
    "a result bigger than memory, shown": Case(sql("SELECT * FROM range(10000000000)"), 0,
                                               "note: showing the first 10000 rows"),
    "CSV to --output streams (300,000 rows)": Case(
        lambda c: ["sql", "SELECT * FROM range(300000)", "--format", "csv", "--store", str(c.store),
                   "--output", str(c.tmp / "big.csv")], 0, ""),
    # -- sql: one line --------------------------------------------------------------------
    "UPDATE EXTENSIONS": Case(sql("UPDATE EXTENSIONS"), 1, "only read-only SELECT queries are allowed"),
    "a 0xFF byte in the query text": Case(sql("SELECT '\udcff'"), 1, "not valid UTF-8 (byte 0xFF"),
    "--format parquet --output /dev/full": Case(sql("SELECT 1", "--format", "parquet", "--output", "/dev/full"), 1,
                                                "No space left on device"),
    "a capped result written to a file": Case(
        lambda c: ["sql", "SELECT * FROM range(20000)", "--format", "json", "--store", str(c.store),
                   "--output", str(c.tmp / "x.json")], 1, "more than 10000 rows"),
    "a query over DuckDB's memory limit": Case(sql("SELECT list(range) AS l FROM range(100000000)"), 1,
                                               "memory limit", env={"SELFREPAIR_MEMORY_LIMIT": "64MB"}),
    # -- ingest: one line, nothing written ---------------------------------------------------
    "corpus: invalid UTF-8 in .jsonl": Case(ingest("--corpus", "{tmp}/bad.jsonl", store="new"), 1, "line 1 is not valid UTF-8",
                                           setup=_write("bad.jsonl", b'{"text": "ab\xff\xfe"}\n')),
    "corpus: random bytes .jsonl": Case(ingest("--corpus", "{tmp}/rnd.jsonl", store="new"), 1, "is not valid UTF-8",
                                       setup=_write("rnd.jsonl", bytes(range(128, 256)) * 8)),
    "corpus: random bytes .parquet": Case(ingest("--corpus", "{tmp}/rnd.parquet", store="new"), 1, "not a readable Parquet file",
                                         setup=_write("rnd.parquet", bytes(range(256)) * 8)),
    "corpus: integer text column": Case(ingest("--corpus", "{tmp}/ints.parquet", store="new"), 1, "holds int64, not strings",
                                       setup=_int_text_parquet),
    "corpus: offline hub dataset": Case(ingest("--corpus", "NeelNanda/pile-10k", store="new"), 1, "cannot load the dataset",
                                       env={"HF_HUB_OFFLINE": "1"}),
    "truncated model.safetensors": Case(ingest("--corpus", "embedded", store="new", model="trunc"), 1, "cannot load model",
                                        setup=_model_copy("trunc", _truncate_weights)),
    "model folder without a tokenizer": Case(ingest("--corpus", "embedded", store="new", model="notok"), 1, "has no tokenizer",
                                             setup=_model_copy("notok", _drop_tokenizer)),
    "empty top-p set (--seq-len 2 --tokens 40)": Case(
        lambda c: ["ingest", "--model", str(c.model), "--store", str(c.tmp / "new"), "--seq-len", "2", "--tokens",
                   "40", "--corpus", "embedded", "--quiet"], 1, "floor(0.02 × 40) = 0 tokens per head"),
    "empty top-p set (--top-p 0.000001)": Case(ingest("--top-p", "0.000001", "--corpus", "embedded", store="new"), 1,
                                              "floor(1e-06 × 62) = 0 tokens per head"),
    "full disk during a Zarr chunk write": Case(ingest("--corpus", "embedded", store="new"), 1,
                                                "out of disk space", patch=_full_disk),
    "derived table path ../../outside/victim.txt": Case(ingest("--corpus", "embedded", "--tokens", "124"), 1,
                                                        "leads outside the model folder", setup=_derived_outside),
    "commits/ a symlink out of the model folder": Case(ingest("--corpus", "embedded", "--tokens", "124"), 1,
                                                       "commits is a symlink", setup=_symlinked("commits")),
    "activations.zarr a symlink out of the model folder": Case(ingest("--corpus", "embedded", "--tokens", "124"), 1,
                                                               "activations.zarr is a symlink",
                                                               setup=_symlinked("activations.zarr")),
    # -- verify: one line --------------------------------------------------------------------
    "verify: corrupt array zarr.json": Case(lambda c: ["verify", "--store", str(c.store)], 1,
                                           "verify found 1 problem", setup=_zarr_json("z")),
    "verify: corrupt group zarr.json": Case(lambda c: ["verify", "--store", str(c.store)], 1,
                                           "verify found 1 problem", setup=_zarr_json(".")),
    # -- paths are literal ---------------------------------------------------------------------
    "model folder a? beside ab": Case(lambda c: ["sql", COUNT, "--store", str(c.tmp / "root" / "a?")], 0,
                                      "62", setup=_neighbours("a?", "ab", model_names=True)),
    "store root r? beside rX": Case(lambda c: ["sql", COUNT, "--store", str(c.tmp / "r?")], 0, "62",
                                    setup=_neighbours("r?", "rX")),
    "store root brack[1] beside brack1": Case(lambda c: ["verify", "--store", str(c.tmp / "brack[1]")], 0,
                                              f"{MODEL}: OK", setup=_neighbours("brack[1]", "brack1")),
    "store root c* beside cX": Case(lambda c: ["sql", COUNT, "--store", str(c.tmp / "c*")], 0, "62",
                                    setup=_neighbours("c*", "cX")),
    "ingest into brack[1] beside brack1": Case(ingest("--corpus", "embedded", "--tokens", "124", store="brack[1]"),
                                               0, "", setup=_neighbours("brack[1]", "brack1"), writes=True),
    "ingest into r? beside rX": Case(ingest("--corpus", "embedded", "--tokens", "124", store="r?"),
                                     0, "", setup=_neighbours("r?", "rX"), writes=True),
    # -- issue 18: the writer lock never writes outside the store ------------------------------
    "compact: .writer.lock a symlink to a file outside": Case(
        lambda c: ["compact", "--store", str(c.store)], 1, "the writer lock", setup=_lock_linked("outside/victim.txt")),
    "compact: .writer.lock a dangling symlink": Case(
        lambda c: ["compact", "--store", str(c.store)], 1, "is a symlink", setup=_lock_linked("outside/new.txt")),
    "ingest: .writer.lock a symlink to a file outside": Case(
        ingest("--corpus", "embedded", "--tokens", "124"), 1, "is a symlink", setup=_lock_linked("outside/victim.txt")),
    "compact: .writer.lock a FIFO": Case(lambda c: ["compact", "--store", str(c.store)], 1, "not a regular file (a FIFO)",
                                         setup=_lock_fifo),
    # -- issue 18: a read-only command never writes into any store's model folder -----------------
    "head --html another store's manifest": Case(
        lambda c: ["head", "L1H1", "--store", str(c.store), "--html", str(c.tmp / "other" / MODEL / "manifest.json")],
        1, "inside the model folder", setup=_other_store),
    "head --html into its own store": Case(
        lambda c: ["head", "L1H1", "--store", str(c.store), "--html", str(c.m / "L1H1.html")], 1, "inside the store"),
    "report --output another store's model folder": Case(
        lambda c: ["report", "--store", str(c.store), "--output", str(c.tmp / "other" / MODEL / "report")], 1,
        "inside the model folder", setup=_other_store),
    "export --output another store's commit log folder": Case(
        lambda c: ["export", "ln_share", "-p", "ablation=zero", "--format", "latex", "--store", str(c.store),
                   "--output", str(c.tmp / "other" / MODEL / "commits" / "t.tex")], 1, "inside the model folder",
        setup=_other_store),
    "sql --output another store's manifest": Case(
        lambda c: ["sql", "SELECT 1", "--store", str(c.store), "--output", str(c.tmp / "other" / MODEL / "manifest.json")],
        1, "inside the model folder", setup=_other_store),
    # -- issue 18: no shard, chunk or model folder read out of the store, no FIFO read -----------------
    "sql: a shard that is a FIFO": Case(sql(COUNT), 1, "is not a regular file (a FIFO", setup=_shard_fifo),
    "compact: a shard that is a FIFO": Case(lambda c: ["compact", "--store", str(c.store)], 1,
                                           "is not a regular file (a FIFO", setup=_shard_fifo),
    "verify: a shard that is a FIFO": Case(verify_store, 1, "is not a regular file (a FIFO", setup=_shard_fifo),
    "sql: a shard symlinked outside": Case(sql(COUNT), 1, "symlink", setup=_shard_linked),
    "compact: a shard symlinked outside": Case(lambda c: ["compact", "--store", str(c.store)], 1, "symlink",
                                               setup=_shard_linked),
    "sql: a model folder symlinked from outside the root": Case(sql(COUNT), 1, "is a symlink", setup=_model_linked),
    "verify: a model folder symlinked from outside the root": Case(verify_store, 1, "is a symlink",
                                                                   setup=_model_linked),
    "verify: activations.zarr symlinked outside": Case(verify_store, 1, "activations.zarr is a symlink",
                                                       setup=_symlinked("activations.zarr")),
    "verify: a Zarr array folder symlinked outside": Case(verify_store, 1, "activations.zarr/z is a symlink",
                                                          setup=_array_linked),
    "verify: a Zarr chunk symlinked outside": Case(verify_store, 1, "is a symlink", setup=_chunk_linked),
    "verify: a Zarr chunk that is a FIFO": Case(verify_store, 1, "is not a regular file (a FIFO", setup=_chunk_fifo),
    # -- issue 18: bounded reads ----------------------------------------------------------------
    "verify: a Zarr shape of 10^15 tokens": Case(verify_store, 1, "token_index is 1000000000000000, more than the 62 tokens",
                                                 setup=_zarr_shape(10**15)),
    "verify: a Zarr chunk of 10^15 tokens": Case(verify_store, 1, "chunk [1000000000000000, 2, 4, 8] is larger",
                                                 setup=_zarr_chunk(10**15)),
    "verify: a 2 MiB zarr.json": Case(verify_store, 1, "Zarr metadata is at most 1048576 bytes",
                                      setup=_zarr_json_padded),
    "sql --file /dev/zero": Case(lambda c: ["sql", "--file", "/dev/zero", "--store", str(c.store)], 1,
                                 "longer than 1048576 bytes"),
    "sql - </dev/zero": Case(lambda c: ["sql", "-", "--store", str(c.store)], 1, "longer than 1048576 bytes",
                             stdin=lambda c: open("/dev/zero", "rb")),
    # -- issue 18: one line, not a traceback (two regressions among them) -------------------------------
    "INTEGER[3] column (regression)": Case(sql("SELECT [1,2,3]::INTEGER[3] AS a"), 0, "[1, 2, 3]"),
    "ingest --seed -1 --resamples 2 (regression)": Case(
        ingest("--corpus", "embedded", "--ablations", "resample", "--seed", "-1", "--resamples", "2", store="new"), 1,
        "seed: must be in [0, 2**63), got -1"),
    "OPT saved without its final norm": Case(ingest("--corpus", "embedded", store="new", model="opt-nofinal"), 1,
                                            "OPT saved without its final LayerNorm", setup=_opt_without_final_norm),
    "head 'L١H١' (Arabic-Indic digits)": Case(lambda c: ["head", "L\u0661H\u0661", "--store", str(c.store)], 1,
                                              "use a label like L26H6"),
}


def _snapshot(root: Path) -> dict[str, str]:
    return tree_hashes(root, ignore=(".writer.lock",))  # the lock file's content is its holder


def run_case(name: str, good: Path, model: Path, tmp: Path, monkeypatch) -> tuple[int, str, str]:
    """Run one case; returns (exit code, its one line, the whole output)."""
    case = CASES[name]
    store = tmp / "store"
    shutil.copytree(good, store, symlinks=True)
    c = SimpleNamespace(tmp=tmp, store=store, model=model, m=store / MODEL, good=good)
    if case.setup:
        case.setup(c)
    if case.patch:
        case.patch(monkeypatch)
    before = _snapshot(tmp)
    args = [a.replace("{tmp}", str(tmp)) for a in case.args(c)]
    stdin = case.stdin(c) if case.stdin else None
    try:
        res = CliRunner().invoke(main, args, env=case.env or None, input=stdin)
    finally:
        if stdin is not None:
            stdin.close()
    assert "Traceback" not in res.output and not isinstance(res.exception, (AssertionError, NameError, TypeError)), \
        res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error")]
    if res.exit_code:
        assert len(errors) == 1, res.output
        if args[0] != "verify":  # verify prints its report, then the one Error line
            assert res.output.strip().splitlines() == errors, res.output
        shown = errors[0]
        fail = next((line.strip() for line in res.output.splitlines() if "FAIL" in line), None)
        if args[0] == "verify" and fail:  # (a store verify cannot read at all is one Error line, no report)
            shown += " — " + fail
    else:
        assert not errors, res.output
        lines = [line for line in res.output.splitlines() if line.strip()]
        shown = next((line for line in lines if case.line and case.line.split("\n")[-1] in line), lines[-1] if lines
                     else "(nothing on the terminal)")
    after = _snapshot(tmp)
    if not case.writes:
        # No file changed or went away, and nothing new appeared anywhere but the top of tmp (an --output file).
        assert {k: after.get(k) for k in before} == before, name
        assert not [k for k in after if k not in before and "/" in k], name
    return res.exit_code, shown, res.output


@pytest.mark.parametrize("name", list(CASES))
def test_red_team_case(name, good_store, model_dir, tmp_path, monkeypatch, record_property):
    code, shown, output = run_case(name, good_store, model_dir, tmp_path, monkeypatch)
    record_property("outcome", json.dumps({"case": name, "exit": code, "line": shown}))
    case = CASES[name]
    assert code == case.code, output
    assert case.line in (shown if code else output), output


ACTIVATIONS_CASES = {
    "activations.zarr symlinked outside": (_symlinked("activations.zarr"), "activations.zarr is a symlink"),
    "an array folder symlinked outside": (_array_linked, "activations.zarr/z is a symlink"),
    "a chunk symlinked outside": (_chunk_linked, "is a symlink"),
    "a chunk that is a FIFO": (_chunk_fifo, "is not a regular file (a FIFO"),
    "a Zarr shape of 10^15 tokens": (_zarr_shape(10**15), "token_index is 1000000000000000, more than the 62 tokens"),
    "a Zarr chunk of 10^15 tokens": (_zarr_chunk(10**15), "chunk [1000000000000000, 2, 4, 8] is larger"),
    "a 2 MiB zarr.json": (_zarr_json_padded, "Zarr metadata is at most 1048576 bytes"),
}


@pytest.mark.parametrize("name", list(ACTIVATIONS_CASES))
def test_python_api_activations_refuse(name, good_store, model_dir, tmp_path):
    # Store.activations() makes verify's check (store/arrays.py check_tree, shape_problems) before zarr opens anything.
    from selfrepair.errors import StoreError
    from selfrepair.queries.store import Store

    setup, line = ACTIVATIONS_CASES[name]
    store = tmp_path / "store"
    shutil.copytree(good_store, store, symlinks=True)
    c = SimpleNamespace(tmp=tmp_path, store=store, model=model_dir, m=store / MODEL, good=good_store)
    setup(c)
    before = _snapshot(tmp_path)
    with Store.open(store) as s:
        with pytest.raises(StoreError) as err:
            s.activations(MODEL)
    assert line in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert _snapshot(tmp_path) == before


def test_paths_read_only_their_own_files(good_store, model_dir, tmp_path, monkeypatch):
    # After the ingest into brack[1], its neighbour brack1 still holds 62 tokens and brack[1] 124.
    run_case("ingest into brack[1] beside brack1", good_store, model_dir, tmp_path, monkeypatch)
    from selfrepair.queries.store import Store

    for name, n in (("brack[1]", 124), ("brack1", 62)):
        with Store.open(tmp_path / name) as s:
            assert s.sql(COUNT)["n"][0] == n, name


def test_derived_path_outside_is_never_deleted(good_store, model_dir, tmp_path, monkeypatch):
    run_case("derived table path ../../outside/victim.txt", good_store, model_dir, tmp_path, monkeypatch)
    assert (tmp_path / "outside" / "victim.txt").read_text() == "precious"


def test_empty_top_p_is_refused_before_the_model_loads(model_dir, tmp_path, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("selfrepair.ingest.models.load_model", no_load)
    res = CliRunner().invoke(main, ["ingest", "--model", str(model_dir), "--store", str(tmp_path / "s"),
                                    "--seq-len", "2", "--tokens", "40", "--corpus", "embedded", "--quiet"])
    assert res.exit_code == 1 and res.output.startswith("Error: top_p: floor(top_p × tokens) = floor(0.02 × 40) = 0"), res.output
    assert not (tmp_path / "s").exists()


# -- a failed or interrupted ingest never leaves a store the same command cannot finish ---------
def _same_numbers(store: Path):
    from selfrepair.queries.store import Store

    with Store.open(store) as s:
        return s.sql("SELECT * FROM self_repair ORDER BY ALL")


def test_deleted_or_damaged_shards_are_recomputed(good_store, model_dir, tmp_path):
    from selfrepair.store.model_store import ModelStore
    from selfrepair.store.verify import verify

    store = tmp_path / "store"
    shutil.copytree(good_store, store)
    before = _same_numbers(store)
    ms = ModelStore(store / MODEL)
    man = ms.manifest()
    clean = sorted(s for s in man.shards if s.startswith("clean"))[0]
    abl = sorted(s for s in man.shards if s.startswith("abl"))[0]
    (ms.path / man.shards[clean].files["head_effects"].path).unlink()  # deleted
    damaged = ms.path / man.shards[abl].files["ablation_effects"].path
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated
    (ms.path / next(iter(man.shards[clean].chunks))).unlink()  # a Zarr chunk too
    report = verify(store)
    assert not report.ok and any("missing" in p for p in report.problems[MODEL])
    res = CliRunner().invoke(main, ["ingest", "--model", str(model_dir), "--store", str(store), *INGEST[:-1],
                                    "--corpus", "embedded"])
    assert res.exit_code == 0, res.output
    assert "resume: 2 committed shard(s) have missing or damaged files" in res.output
    assert verify(store).ok
    assert _same_numbers(store).equals(before)


def test_killed_extension_then_the_original_command(good_store, model_dir, tmp_path, monkeypatch):
    from selfrepair.store.model_store import ModelStore
    from selfrepair.store.verify import verify
    from selfrepair.store.writer import Writer

    store = tmp_path / "store"
    shutil.copytree(good_store, store)
    commit, calls = Writer.commit_written, []

    def killed_on_the_second(self, shard_id, entry, *a, **k):
        if entry["phase"] == "clean":
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt  # the extension dies after its first new clean shard
        return commit(self, shard_id, entry, *a, **k)

    monkeypatch.setattr(Writer, "commit_written", killed_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        ingest_tiny(model_dir, store, **ARGS | {"tokens": 310})
    monkeypatch.setattr(Writer, "commit_written", commit)
    ms = ModelStore(store / MODEL)
    man = ms.manifest()
    stored = max(e.rows[1] for e in man.shards.values() if e.phase == "clean") * 31
    assert man.n_tokens <= stored  # never ahead of the stored tokens
    ingest_tiny(model_dir, store, **ARGS)  # the original command finishes what is stored
    man = ms.manifest()
    from selfrepair.queries.store import Store

    with Store.open(store) as s:
        assert s.sql(COUNT)["n"][0] == man.n_tokens == stored
    assert man.derived["head_top_tokens"].n_tokens == man.n_tokens
    assert verify(store).ok
