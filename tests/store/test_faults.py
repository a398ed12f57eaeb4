"""Fault injection you can repeat (issue 18, requirement 5; `store/faults.py`).

Each command — a fresh ingest, extensions with more tokens, more heads and more resample
draws, `compact` — is SIGKILLed at each commit point it reaches (SELFREPAIR_FAULT), rerun
without the fault, and its store must then hold exactly the rows of a one-shot run of the
final configuration (every table, sorted by its key), with no duplicate key, and pass
`verify`. Then every kill point in sequence on one store, ten rounds of two ingests and a
`compact` racing on one store, and the variable on a real `selfrepair compact` process (a Ray
worker killed after writing a unit: test_faults_ray.py, on the Ray the suite's Ray tests share).

Commands run in children forked from `fault_runner.py`, a process that has loaded torch
and the tiny model once, so a run costs a fraction of a second instead of an interpreter
start, and independent cases run side by side. Each rerun's child computes its store's
digest (per table: rows, duplicate keys by SQL GROUP BY … HAVING count(*) > 1, SHA-256 of
the rows sorted by key; and `verify`), compared here with the one-shot run's. Stores live
on /dev/shm where there is one: fsync is most of a run's cost on disk, and a SIGKILL
loses nothing the page cache holds, so the kill is the same.
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
from selfrepair.errors import ConfigError
from selfrepair.store import faults
from selfrepair.store.schema import TABLES

pytestmark = pytest.mark.slow  # every kill point of every command, each checked against a one-shot run

RUNNER = Path(__file__).with_name("fault_runner.py")
KILLED = -9  # a child's exit code when SIGKILL ended it
PARALLEL = max(1, min(4, os.cpu_count() or 1))

# The smallest useful store: 10 rows × 15 predictions in 2 batches, 2 heads, one resample
# draw, neuron detail by sr_mlps for one head (so all three shard phases are written), one
# activation array (each clean shard writes its Zarr chunks; more arrays only cost time).
BASE = dict(tokens=150, seq_len=16, batch_size=5, ablations=["resample"], heads="L0H0,L1H1", top_p=0.05,
            neurons_top_k=3, sr_mlps_neurons="L1H1", activations=["resid_final"])
# Each command's final configuration (an extension starts from a one-shot BASE store).
FINAL = {
    "fresh": {},
    "tokens": {"tokens": 225},
    "heads": {"heads": "L0H0,L0H1,L1H1,L1H2"},
    "draws": {"resamples": 2},
    "compact": {},
}
ALL = BASE | FINAL["tokens"] | FINAL["heads"] | FINAL["draws"]  # the sequence's final configuration
SEQUENCE = ("fresh", "tokens", "heads", "draws", "compact")
RACE_ROUNDS = 10
RACE_GROWTH = 15  # tokens per round: one row, so each round redoes the partial last batch
RACE = BASE | {"heads": "L1H1", "sr_mlps_neurons": "none"}  # ten rounds: the least work that still races
RACE_FINAL = RACE | {"tokens": BASE["tokens"] + RACE_GROWTH * RACE_ROUNDS, "resamples": 2}

# Kill points (point[:n]) per command: every point the command reaches (test_matrix_covers_every_point
# checks this against a trace), with n > 1 where a later hit leaves the store in another state.
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
                "writer.orphan.removed:12", *CKPT],  # 12 of the 24 old files deleted: mid-deletion
}
CASES = [(cmd, spec) for cmd, specs in MATRIX.items() for spec in specs]
MATRIX_KEYS = set(CASES)


def step(cmd: str, root: Path, config: dict | None = None, fault: str | None = None, **extra) -> dict:
    """A runner step: `cmd` is "compact", "none" (a digest alone) or a FINAL key (an ingest)."""
    if cmd in FINAL and cmd != "compact":
        config, cmd = BASE | FINAL[cmd] if config is None else config, "ingest"
    return {"cmd": cmd, "root": str(root), "config": config or {}, "fault": fault, **extra}


class Runner:
    """The fork server (`fault_runner.py`): one request and one answer per line."""

    def __init__(self, model_dir: Path):
        self.proc = subprocess.Popen([sys.executable, str(RUNNER), str(model_dir)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}
        self.cpu: list[float] = []  # CPU seconds of each job run so far

    def jobs(self, jobs: list[list[dict]]) -> list[list]:
        """Each job's items in order, PARALLEL jobs at a time (see fault_runner.py); each item's result."""
        self.proc.stdin.write(json.dumps({"jobs": jobs, "parallel": PARALLEL}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the fault runner died"
        answers = json.loads(line)["results"]
        self.cpu.extend(a["cpu"] for a in answers)
        return [a["results"] for a in answers]

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
    r = Runner(scratch / "tiny-gpt2")
    yield r
    r.close()


@pytest.fixture(scope="module")
def references(runner, scratch) -> dict[str, dict]:
    """One-shot stores, built once per final configuration (side by side): name -> {root, digest}."""
    configs = {cmd: BASE | FINAL[cmd] for cmd in FINAL if cmd != "compact"} | {"all": ALL, "race": RACE_FINAL}
    results = runner.jobs([[step("ingest", scratch / f"reference-{n}", c, check=True)] for n, c in configs.items()])
    out = {}
    for name, (res,) in zip(configs, results):
        assert res["rc"] == 0, name
        out[name] = {"root": scratch / f"reference-{name}", "digest": res["check"]}
    out["compact"] = out["fresh"]  # compaction keeps its store's rows
    return out


def start(cmd: str, root: Path, references) -> Path:
    """The store a command starts from: nothing for a fresh ingest, a copy of the one-shot BASE store otherwise."""
    if cmd != "fresh":
        shutil.copytree(references["fresh"]["root"], root, ignore=shutil.ignore_patterns(".writer.lock"))
    return root


@pytest.fixture(scope="module")
def campaign(runner, references, scratch) -> dict:
    """Everything the tests below check, run side by side in one batch (longest jobs first):
    the sequence, the race, a trace of each command, and every case of the matrix."""
    jobs = {"sequence": sequence_job(scratch / "sequence"), "race": race_job(scratch / "race")}
    for cmd in MATRIX:
        jobs[("trace", cmd)] = [step(cmd, start(cmd, scratch / f"trace-{cmd}", references), fault="trace")]
    for cmd, spec in CASES:
        root = start(cmd, scratch / f"case-{cmd}-{spec}", references)
        jobs[(cmd, spec)] = [step(cmd, root, fault=spec), step(cmd, root, check=True)]
    done = len(runner.cpu)
    out = dict(zip(jobs, runner.jobs(list(jobs.values()))))
    cpu = dict(zip(jobs, runner.cpu[done:]))
    parts = {"sequence": cpu["sequence"], "race": cpu["race"],
             "traces": sum(v for k, v in cpu.items() if k[0] == "trace"),
             "matrix": sum(v for k, v in cpu.items() if k in MATRIX_KEYS)}
    print("\nCPU seconds in the runner's children: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
    return out


def sequence_job(root: Path) -> list[dict]:
    """A fresh ingest, the three extensions and `compact` on one store, each run until done with
    every run killed at the next point (the first not killed yet); then the store's digest."""
    items, config = [], dict(BASE)
    for cmd in SEQUENCE:
        config = config | FINAL[cmd]  # a new dict: each item keeps its own
        items.append({"until_done": step("compact" if cmd == "compact" else "ingest", root, config)})
    return items + [step("none", root, check=True)]


def race_job(root: Path) -> list[dict]:
    """A RACE store, then RACE_ROUNDS rounds on it, each two ingests (one more row of tokens; one of them
    with a second draw too) and a `compact` released together; a writer refused by the lock retries."""
    items = [step("ingest", root, RACE)]
    for r in range(1, RACE_ROUNDS + 1):
        tokens = RACE["tokens"] + RACE_GROWTH * r
        items.append({"race": [step("ingest", root, RACE | {"tokens": tokens}, retry_busy=True),
                               step("ingest", root, RACE | {"tokens": tokens, "resamples": 2}, retry_busy=True),
                               step("compact", root, retry_busy=True)]})
    return items + [step("none", root, check=True)]


def tables(root: Path) -> dict[str, pl.DataFrame]:
    s = Store.open(root)
    return {name: s.sql(f"SELECT * FROM {name}").sort(list(t.key)) for name, t in TABLES.items()}


def lost_or_duplicated(got: dict[str, pl.DataFrame], want: dict[str, pl.DataFrame]) -> dict[str, int]:
    """Per table, rows of the reference missing from the store, rows it lacks, and rows beyond one per key (SQL)."""
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


def assert_like(root: Path, digest: dict, reference: dict) -> None:
    """The store's digest equals the one-shot run's, no table has a duplicate key, verify passes."""
    assert digest["verify_ok"], digest["verify_problems"]
    dups = {t: d["duplicate_keys"] for t, d in digest["tables"].items() if d["duplicate_keys"]}
    assert dups == {}, f"duplicate keys: {dups}"
    if digest["tables"] != reference["digest"]["tables"]:
        bad = lost_or_duplicated(tables(root), tables(reference["root"]))
        differ = [t for t in TABLES if digest["tables"][t] != reference["digest"]["tables"][t]]
        pytest.fail(f"tables differ from the one-shot run: {differ}; rows lost or duplicated: {bad}")


@pytest.mark.parametrize("cmd,spec", CASES, ids=[f"{c}-{s}" for c, s in CASES])
def test_kill_then_rerun_equals_one_shot(campaign, references, scratch, cmd, spec):
    killed, rerun = campaign[(cmd, spec)]
    assert killed["rc"] == KILLED, f"{spec} was not reached by {cmd} (exit {killed['rc']})"
    assert rerun["rc"] == 0
    assert_like(scratch / f"case-{cmd}-{spec}", rerun["check"], references[cmd])
    if cmd == "compact":  # a rerun finishes the deletion a kill interrupted
        assert rerun["check"]["orphans"] == []


@pytest.mark.parametrize("cmd", list(MATRIX))
def test_matrix_covers_every_point(campaign, cmd):
    """Every point a command reaches (traced, not killed) is in its row of the matrix, as often as it says."""
    (res,) = campaign[("trace", cmd)]
    assert res["rc"] == 0
    hits = res["trace"]
    assert set(hits) == {s.partition(":")[0] for s in MATRIX[cmd]}
    for spec in MATRIX[cmd]:
        name, _, n = spec.partition(":")
        assert hits[name] >= int(n or 1), spec


def outcome(killed: dict, rerun: dict, reference: dict) -> str:
    """One matrix cell: what a kill and its rerun left, in words."""
    if killed["rc"] != KILLED:
        return f"not killed (exit {killed['rc']})"
    if rerun["rc"] != 0:
        return f"rerun failed (exit {rerun['rc']})"
    check = rerun["check"]
    dups = sum(t["duplicate_keys"] for t in check["tables"].values())
    differ = [t for t in TABLES if check["tables"][t] != reference["digest"]["tables"][t]]
    return (("equal" if not differ else "DIFFERS: " + ",".join(differ)) + f", {dups} dup"
            + (", verify OK" if check["verify_ok"] else ", verify FAILS"))


def test_print_the_matrix(campaign, references):
    """The fault-injection matrix, kill point by command, as a Markdown table (pytest -s shows it)."""
    points = list(dict.fromkeys(spec for specs in MATRIX.values() for spec in specs))
    lines = ["| kill point | " + " | ".join(MATRIX) + " |", "|---" * (len(MATRIX) + 1) + "|"]
    results = []
    for spec in points:
        cells = [outcome(*campaign[(cmd, spec)], references[cmd]) if spec in MATRIX[cmd] else "—"
                 for cmd in MATRIX]
        results += [c for c in cells if c != "—"]
        lines.append(f"| `{spec}` | " + " | ".join(cells) + " |")
    print("\n" + "\n".join(lines))
    assert len(results) == len(CASES)
    assert set(results) == {"equal, 0 dup, verify OK"}, "\n".join(lines)


def test_every_kill_point_in_sequence_on_one_store(campaign, references, scratch):
    """A fresh ingest, the three extensions and `compact` on one store: each run is killed at the
    first point not killed yet (so each rerun dies at the next point) until one finishes; checked once."""
    *stages, final = campaign["sequence"]
    kills = {}
    for cmd, runs in zip(SEQUENCE, stages):
        *killed, done = runs
        assert done["rc"] == 0, (cmd, done)
        assert all(r["rc"] == KILLED for r in killed)
        seen = [r["killed_at"] for r in killed]
        # Every point of the row (a resume's cleanup too), except one a rerun no longer reaches:
        # after a kill between a checkpoint's rename and its old log's removal, no record is left to fold.
        missing = {s.partition(":")[0] for s in MATRIX[cmd]} - set(seen)
        assert missing <= {"writer.checkpoint.done"}, (cmd, missing)
        kills[cmd] = len(seen)
    assert_like(scratch / "sequence", final["check"], references["all"])
    print(f"\nsequence: {sum(kills.values())} kills on one store ({kills}); the final store equals the one-shot "
          "run, 0 duplicate keys, verify OK")


def test_two_ingests_and_compact_race_for_ten_rounds(campaign, references, scratch):
    """Rows lost or duplicated after the race (race_job), counted with SQL against the one-shot run."""
    first, *rounds, final = campaign["race"]
    assert first["rc"] == 0
    assert [[res["rc"] for res in r] for r in rounds] == [[0, 0, 0]] * RACE_ROUNDS
    refusals = sum(res["refusals"] for r in rounds for res in r)
    root = scratch / "race"
    bad = lost_or_duplicated(tables(root), tables(references["race"]["root"]))
    assert bad == {}, f"rows lost or duplicated: {bad}"
    assert_like(root, final["check"], references["race"])
    assert CliRunner().invoke(main, ["verify", "--store", str(root)]).exit_code == 0
    print(f"\nrace: {RACE_ROUNDS} rounds of 2 ingests + compact on one store, {refusals} lock refusals "
          f"retried, {sum(bad.values())} rows lost or duplicated, verify OK")


def test_the_variable_kills_a_real_compact(runner, references, scratch):
    """SELFREPAIR_FAULT in a `selfrepair compact` process's environment: it dies there (rc -9); rerun, same rows."""
    root = start("compact", scratch / "cli-compact", references)
    cli = Path(sys.executable).with_name("selfrepair")
    res = subprocess.run([str(cli), "compact", "--store", str(root)], capture_output=True, text=True, timeout=120,
                         env=os.environ | {faults.ENV: "compact.committed"})
    assert res.returncode == KILLED, res.stderr
    ((rerun,),) = runner.jobs([[step("compact", root, check=True)]])
    assert rerun["rc"] == 0
    assert_like(root, rerun["check"], references["compact"])
    assert CliRunner().invoke(main, ["verify", "--store", str(root)]).exit_code == 0


@pytest.mark.parametrize("spec", ["x:0", "x:-1", "x:one", ":2", "x:١"])
def test_a_malformed_fault_is_refused(spec):
    with pytest.raises(ConfigError, match="SELFREPAIR_FAULT"):
        faults.parse(spec)


def test_a_fault_spec_parses():
    assert faults.parse(None) is None and faults.parse("") is None
    assert faults.parse("compact.written") == ("compact.written", 1)
    assert faults.parse("writer.set.appended:3") == ("writer.set.appended", 3)
