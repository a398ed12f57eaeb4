"""Fault injection you can repeat (issue 18, requirement 5; `store/faults.py`).

Each command — a fresh ingest, extensions with more tokens, more heads and more resample
draws, `compact` — is SIGKILLed at each commit point it reaches (SELFREPAIR_FAULT), rerun
without the fault, and its store must then hold exactly the rows of a one-shot run of the
final configuration (every table, sorted by its key), with no duplicate key, and pass
`selfrepair verify`. Then every kill point in sequence on one store, ten rounds of two
ingests and a `compact` racing on one store, and a Ray worker killed after writing a unit.

Commands run in children forked from `fault_runner.py`, a process that has loaded torch
and the tiny model once, so a run costs a fraction of a second instead of an interpreter
start. Stores live on /dev/shm where there is one (fsync is most of a run's cost on disk,
and a SIGKILL loses nothing the page cache holds, so the kill is the same).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import duckdb
import polars as pl
import pytest
from click.testing import CliRunner

from selfrepair import Store
from selfrepair.cli import main
from selfrepair.store import faults
from selfrepair.store.schema import TABLES
import tiny_models

RUNNER = Path(__file__).with_name("fault_runner.py")
KILLED = -9  # a child's exit code when SIGKILL ended it

# The smallest useful store: 10 rows × 15 predictions in 2 batches, 2 heads, one resample
# draw, neuron detail by sr_mlps for one head (so all three shard phases are written).
BASE = dict(tokens=150, seq_len=16, batch_size=5, ablations=["resample"], heads="L0H0,L1H1", top_p=0.05,
            neurons_top_k=3, sr_mlps_neurons="L1H1")
# Each command's final configuration (an extension starts from a one-shot BASE store).
FINAL = {
    "fresh": {},
    "tokens": {"tokens": 225},
    "heads": {"heads": "L0H0,L0H1,L1H1,L1H2"},
    "draws": {"resamples": 2},
    "compact": {},
}
# Kill points (point:n) per command: every point the command reaches (test_matrix_covers_every_point
# checks that against a trace), n > 1 where a later hit leaves the store in another state.
CKPT = ["writer.checkpoint.log_created", "writer.checkpoint.renamed", "writer.checkpoint.done"]
MATRIX = {
    "fresh": [*CKPT, *(f"{p}:2" for p in CKPT),  # 1: the store's creation; 2: the final fold
              "writer.derived.vocab.written", "writer.derived.vocab.appended",
              "writer.shard.clean.written", "writer.shard.clean.appended", "writer.shard.clean.appended:2",
              "writer.set.appended", "writer.set.appended:2",  # the arrays' facts; the token count grown
              "writer.derived.head_top_tokens.written", "writer.derived.head_top_tokens.appended",
              "writer.shard.ablation.written", "writer.shard.ablation.appended",
              "writer.shard.neurons.written", "writer.shard.neurons.appended"],
    "tokens": ["writer.set.appended", "writer.set.appended:2", "writer.set.appended:3",
               "writer.shard.clean.written", "writer.shard.clean.appended",
               "writer.derived.head_top_tokens.written", "writer.derived.head_top_tokens.appended",
               "writer.shard.ablation.written", "writer.shard.ablation.appended",
               "writer.shard.neurons.written", "writer.shard.neurons.appended", *CKPT],
    "heads": ["writer.set.appended", "writer.shard.ablation.written", "writer.shard.ablation.appended",
              "writer.shard.ablation.appended:2", *CKPT],
    "draws": ["writer.set.appended", "writer.shard.ablation.written", "writer.shard.ablation.appended",
              "writer.shard.neurons.written", "writer.shard.neurons.appended", *CKPT],
    "compact": ["compact.written", "compact.committed", "writer.orphan.removed",
                "writer.orphan.removed:12", *CKPT],  # 12 of 24 old files deleted: mid-deletion
}
CASES = [(cmd, spec) for cmd, specs in MATRIX.items() for spec in specs]


class Runner:
    """The fork server (`fault_runner.py`): one request and one answer per line."""

    def __init__(self, model_dir: Path):
        self.proc = subprocess.Popen([sys.executable, str(RUNNER), str(model_dir)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the fault runner died"
        return json.loads(line)

    def run(self, cmd: str, root: Path, fault: str | None = None) -> dict:
        """Run a command ("compact" or one of FINAL's ingests) on `root` in a forked child."""
        config = {} if cmd == "compact" else BASE | FINAL[cmd]
        return self.ask({"run": {"cmd": "compact" if cmd == "compact" else "ingest", "root": str(root),
                                 "config": config, "fault": fault}})

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def scratch():
    """A folder for the module's stores, in memory when the machine has /dev/shm."""
    shm = Path("/dev/shm")
    path = Path(tempfile.mkdtemp(prefix="selfrepair-faults-", dir=shm if shm.is_dir() else None))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def runner(scratch):
    r = Runner(tiny_models.save("gpt2", scratch / "tiny-gpt2"))
    yield r
    r.close()


@pytest.fixture(scope="module")
def references(runner, scratch):
    """One-shot stores, built once per final configuration: {name: (root, tables)}."""
    cache: dict[str, tuple[Path, dict]] = {}

    def get(cmd: str) -> tuple[Path, dict]:
        name = "fresh" if cmd == "compact" else cmd  # compaction keeps the rows of its store
        if name not in cache:
            root = scratch / f"reference-{name}"
            assert runner.run(name, root)["rc"] == 0
            cache[name] = (root, tables(root))
        return cache[name]

    return get


def tables(root: Path) -> dict[str, pl.DataFrame]:
    s = Store.open(root)
    return {name: s.sql(f"SELECT * FROM {name}").sort(list(t.key)) for name, t in TABLES.items()}


def duplicate_keys(root: Path) -> dict[str, int]:
    """Per table, the number of keys held by more than one row (SQL over the store's views)."""
    s = Store.open(root)
    out = {}
    for name, t in TABLES.items():
        key = ", ".join(t.key)
        n = s.sql(f"SELECT count(*) AS n FROM (SELECT {key} FROM {name} GROUP BY {key} HAVING count(*) > 1)")
        out[name] = int(n["n"][0])
    return {k: v for k, v in out.items() if v}


def lost_or_duplicated(got: dict[str, pl.DataFrame], want: dict[str, pl.DataFrame]) -> dict[str, int]:
    """Per table, rows of the reference missing from the store plus rows beyond one per reference row."""
    out = {}
    con = duckdb.connect()
    try:
        for name, t in TABLES.items():
            key = ", ".join(t.key)
            con.register("g", got[name].to_arrow())
            con.register("w", want[name].to_arrow())
            n = con.execute(f"""
                SELECT (SELECT count(*) FROM w ANTI JOIN g USING ({key}))
                     + (SELECT count(*) FROM g ANTI JOIN w USING ({key}))
                     + (SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM g GROUP BY {key}))
            """).fetchall()[0][0]
            if n:
                out[name] = int(n)
    finally:
        con.close()
    return out


def verify_rc(root: Path) -> int:
    return CliRunner().invoke(main, ["verify", "--store", str(root)]).exit_code


def assert_like_one_shot(root: Path, want: dict[str, pl.DataFrame]) -> None:
    got = tables(root)
    assert lost_or_duplicated(got, want) == {}
    assert duplicate_keys(root) == {}
    for name in TABLES:
        assert got[name].equals(want[name]), f"{name} differs from the one-shot run"
    assert verify_rc(root) == 0


def start(cmd: str, root: Path, references) -> None:
    """The store a command starts from: nothing for a fresh ingest, a one-shot BASE store otherwise."""
    if cmd != "fresh":
        shutil.copytree(references("fresh")[0], root, ignore=shutil.ignore_patterns(".writer.lock"))


@pytest.mark.parametrize("cmd,spec", CASES, ids=[f"{c}-{s}" for c, s in CASES])
def test_kill_then_rerun_equals_one_shot(runner, references, scratch, cmd, spec):
    root = scratch / f"case-{cmd}-{spec}"
    start(cmd, root, references)
    killed = runner.run(cmd, root, fault=spec)
    assert killed["rc"] == KILLED, f"{spec} was not reached by {cmd} (exit {killed['rc']})"
    assert runner.run(cmd, root)["rc"] == 0
    assert_like_one_shot(root, references(cmd)[1])
    shutil.rmtree(root)


def test_matrix_covers_every_point(runner, references, scratch):
    """Every point a command reaches (traced, not killed) is in its row of the matrix."""
    for cmd in MATRIX:
        root = scratch / f"trace-{cmd}"
        start(cmd, root, references)
        hits = runner.run(cmd, root, fault="trace")["trace"]
        assert set(hits) == {s.partition(":")[0] for s in MATRIX[cmd]}, cmd
        for spec in MATRIX[cmd]:
            name, _, n = spec.partition(":")
            assert hits[name] >= int(n or 1), spec
        shutil.rmtree(root)


def test_every_kill_point_in_sequence_on_one_store(runner, references, scratch):
    """Fresh ingest, the three extensions and `compact` on one store: each run is killed at the
    next point of the command's row (a rerun is itself killed), then one clean rerun; checked once."""
    root = scratch / "sequence"
    fired = 0
    final = BASE | {k: v for cmd in ("tokens", "heads", "draws") for k, v in FINAL[cmd].items()}
    for cmd in ("fresh", "tokens", "heads", "draws", "compact"):
        config = {} if cmd == "compact" else BASE | {k: v for c in list(FINAL)[:list(FINAL).index(cmd) + 1]
                                                         for k, v in FINAL[c].items()}
        request = {"cmd": "compact" if cmd == "compact" else "ingest", "root": str(root), "config": config}
        for spec in MATRIX[cmd]:
            rc = runner.ask({"run": request | {"fault": spec}})["rc"]
            assert rc in (0, KILLED), (cmd, spec, rc)  # 0: the work that point guards was already done
            fired += rc == KILLED
        assert runner.ask({"run": request | {"fault": None}})["rc"] == 0
    assert fired >= len(CASES) * 2 // 3, f"only {fired} of {len(CASES)} kills fired"
    ref = scratch / "reference-sequence"
    assert runner.ask({"run": {"cmd": "ingest", "root": str(ref), "config": final, "fault": None}})["rc"] == 0
    assert_like_one_shot(root, tables(ref))
    print(f"\nsequence: {fired} of {len(CASES)} kills fired on one store; equal to the one-shot run, "
          "0 duplicate keys, verify OK")


def test_two_ingests_and_compact_race_for_ten_rounds(runner, scratch):
    """Each round, two ingests (one more batch of tokens; one of them also a second draw) and a
    `compact` start together on one store; a writer refused by the lock retries. Rows lost or
    duplicated against a one-shot run are counted with SQL."""
    root = scratch / "race"
    root.mkdir()
    refusals, rounds = 0, 10
    for r in range(rounds):
        tokens = 150 + 75 * r
        one = {"cmd": "ingest", "root": str(root), "config": BASE | {"tokens": tokens}, "retry_busy": True}
        two = {**one, "config": BASE | {"tokens": tokens, "resamples": 2}}
        answer = runner.ask({"race": [one, two, {"cmd": "compact", "root": str(root), "retry_busy": True}]})
        assert answer["rcs"] == [0, 0, 0], answer
        refusals += sum(answer["refusals"])
        assert duplicate_keys(root) == {}, f"round {r}"
    ref = scratch / "reference-race"
    final = BASE | {"tokens": 150 + 75 * (rounds - 1), "resamples": 2}
    assert runner.ask({"run": {"cmd": "ingest", "root": str(ref), "config": final, "fault": None}})["rc"] == 0
    bad = lost_or_duplicated(tables(root), tables(ref))
    assert bad == {}, bad
    assert verify_rc(root) == 0
    print(f"\nrace: {rounds} rounds of 2 ingests + compact, {refusals} lock refusals retried, "
          f"{sum(bad.values())} rows lost or duplicated, verify OK")


def test_the_variable_kills_a_real_compact(runner, references, scratch):
    """SELFREPAIR_FAULT set for a `selfrepair compact` process: it dies at the point (rc -9); rerun, same rows."""
    root = scratch / "cli-compact"
    start("compact", root, references)
    cli = Path(sys.executable).with_name("selfrepair")
    res = subprocess.run([str(cli), "compact", "--store", str(root)], capture_output=True, text=True, timeout=120,
                         env=os.environ | {faults.ENV: "compact.committed"})
    assert res.returncode == KILLED, res.stderr
    assert runner.run("compact", root)["rc"] == 0
    assert_like_one_shot(root, references("compact")[1])


@pytest.mark.parametrize("spec", ["", "x:0", "x:-1", "x:one", ":2", "x:١"])
def test_a_malformed_fault_is_one_error(spec):
    if not spec:
        assert faults.parse(spec) is None
        return
    with pytest.raises(ValueError, match="SELFREPAIR_FAULT"):
        faults.parse(spec)
    assert faults.parse("writer.set.appended:3") == ("writer.set.appended", 3)
