"""Eight processes query one store while an ingest appends shards: every query succeeds and
sees a consistent set of shards (its table row counts equal its manifest snapshot's).

The nine are processes of their own, forked from the session's fork server (tests/cli_fork.py)."""

import json
import textwrap

import pytest

pytestmark = pytest.mark.slow  # a real ingest process and eight reader processes

READER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from selfrepair import Store
    root, done_flag = Path(sys.argv[1]), Path(sys.argv[2])
    ok, seen, shards_seen = 0, set(), 0
    deadline = time.time() + 300
    while time.time() < deadline:
        finished = done_flag.exists()
        if not (root / "tiny-neox" / "manifest.json").exists():
            time.sleep(0.05)
            continue
        s = Store.open(root)
        man = s.manifest("tiny-neox")
        want = {}
        for entry in man.shards.values():
            for table, f in entry.files.items():
                want[table] = want.get(table, 0) + f.rows
        # The ingest compacts at its end: compacted files then hold the shards' rows.
        for table, parts in man.compacted.items():
            want[table] = want.get(table, 0) + sum(f.rows for f in parts)
        got = s.sql("SELECT (SELECT count(*) FROM tokens) AS tokens, (SELECT count(*) FROM head_effects) AS head_effects,"
                    " (SELECT count(*) FROM ablation_effects) AS ablation_effects,"
                    " (SELECT count(*) FROM self_repair) AS self_repair").row(0, named=True)
        for table in ("tokens", "head_effects", "ablation_effects"):
            assert got[table] == want.get(table, 0), (table, got, want)
        # Every ablation row joins to its clean rows: the clean shards were committed first.
        assert got["self_repair"] == got["ablation_effects"], got
        s.close()
        ok += 1
        seen.add(len(man.shards))
        if finished:
            break
    print(json.dumps({"ok": ok, "distinct_snapshots": len(seen), "max_shards": max(seen)}))
""")


def test_eight_readers_while_ingest_appends(tiny_model_dirs, forks, tmp_path):
    store, flag = tmp_path / "store", tmp_path / "done"
    ingest = forks.cli([
        "ingest", "--model", tiny_model_dirs["neox"], "--store", store, "--tokens", str(31 * 24), "--seq-len", "32",
        "--batch-size", "2", "--corpus", "embedded", "--ablations", "resample,mean,zero", "--quiet"])
    readers = [forks.python(READER, [store, flag]) for _ in range(8)]
    assert ingest.wait(timeout=300) == 0, ingest.stderr
    flag.touch()
    results = []
    for r in readers:
        assert r.wait(timeout=300) == 0, r.stderr
        results.append(json.loads(r.stdout))
    assert all(r["ok"] >= 1 for r in results)
    assert max(r["max_shards"] for r in results) == 12 * 4  # the last snapshot saw every shard
    assert sum(r["distinct_snapshots"] for r in results) > 8  # readers really overlapped the appends
