"""Commit protocol at scale: the cost of committing a shard, first 10% against last 10%.

Usage:
    python benchmarks/bench_commits.py [--shards 4000] [--old 1000]

Commits `--shards` shard records shaped like the runner's (7 table files per clean shard
with its chunk checksums, 3–4 per ablation shard) through `store.Writer`, without writing
the Parquet files themselves, so the figures are the protocol's own: seconds per commit
in the first and last 10% of the run, bytes written to manifest and log against the
final manifest, and `Store.open`-style snapshot time. `--old` shards are committed the
pre-log way (the whole manifest rewritten per commit) in the same run, as the baseline.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from selfrepair.store import files, snapshot
from selfrepair.store.model_store import ModelStore
from selfrepair.store.writer import Writer

MANIFEST = {"model": {"name": "bench", "n_layers": 2, "n_heads": 4}, "n_tokens": 0, "n_rows": 0, "seq_len": 64}


def _entry(i: int) -> dict:
    f = lambda t: {"path": f"tables/{t}/s{i:08d}.parquet", "rows": 504, "bytes": 12345, "sha256": "ab" * 32}  # noqa: E731
    if i % 4 == 0:
        chunks = {f"activations.zarr/{a}/c/{i}/0/0": "cd" * 32 for a in ("resid_pre", "resid_final", "z", "norm_scales",
                                                                         "mlp_post_final")}
        return {"phase": "clean", "rows": [i, i + 8], "files": {t: f(t) for t in ("tokens", "head_effects", "mlp_effects")},
                "chunks": chunks}
    return {"phase": "ablation", "rows": [i, i + 8], "ablation": "resample", "sample": 0, "heads": "all",
            "files": {t: f(t) for t in ("ablation_effects", "repair_sources", "neuron_effects", "resample_sources")}}


class _Bytes:
    """Counts the bytes the protocol writes (atomic writes and log appends)."""

    def __init__(self):
        self.n = 0
        self._atomic, self._append = files.atomic_write_bytes, files.append_line

    def __enter__(self):
        def atomic(path, data):
            self.n += len(data)
            return self._atomic(path, data)

        def append(fd, path, line):
            self.n += len(line)
            return self._append(fd, path, line)

        files.atomic_write_bytes, files.append_line = atomic, append
        return self

    def __exit__(self, *exc):
        files.atomic_write_bytes, files.append_line = self._atomic, self._append


def _shares(times: list[float]) -> tuple[float, float]:
    k = max(1, len(times) // 10)
    return sum(times[:k]) / k, sum(times[-k:]) / k


def run_log(folder: Path, n: int) -> dict:
    ms = ModelStore(folder)
    with _Bytes() as written:
        w = Writer.open(ms)
        w.create(dict(MANIFEST))
        times = []
        for i in range(n):
            t = time.perf_counter()
            w._append({"op": "shard", "id": f"s{i:08d}", "entry": _entry(i), "supersedes": []})
            times.append(time.perf_counter() - t)
        w.close()
    final = ms.manifest_path.stat().st_size
    t = time.perf_counter()
    snapshot.read(folder)
    return {"first": _shares(times)[0], "last": _shares(times)[1], "written": written.n, "final": final,
            "open": time.perf_counter() - t}


def run_rewrite(folder: Path, n: int) -> dict:
    """The pre-log protocol: read, update and atomically rewrite the whole manifest per commit."""
    folder.mkdir(parents=True)
    path = folder / "manifest.json"
    files.atomic_write_json(path, MANIFEST | {"shards": {}, "schema_version": 1})
    times, written = [], 0
    for i in range(n):
        t = time.perf_counter()
        m = files.read_json(path)
        m["shards"][f"s{i:08d}"] = _entry(i)
        files.atomic_write_json(path, m)
        times.append(time.perf_counter() - t)
        written += path.stat().st_size
    return {"first": _shares(times)[0], "last": _shares(times)[1], "written": written, "final": path.stat().st_size}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=4000)
    ap.add_argument("--old", type=int, default=1000)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [("commit log", args.shards, run_log(Path(tmp) / "log", args.shards))]
        if args.old:
            rows.append(("commit log", args.old, run_log(Path(tmp) / "log-small", args.old)))
            rows.append(("manifest rewrite (before)", args.old, run_rewrite(Path(tmp) / "old", args.old)))
    print(f"{'protocol':<26} {'shards':>7} {'ms/commit first 10%':>20} {'last 10%':>9} {'written / final manifest':>25} "
          f"{'snapshot read':>14}")
    for name, n, r in rows:
        opened = f"{r['open'] * 1e3:.1f} ms" if "open" in r else "-"
        print(f"{name:<26} {n:>7} {r['first'] * 1e3:>20.2f} {r['last'] * 1e3:>9.2f} "
              f"{r['written'] / r['final']:>24.1f}× {opened:>14}")


if __name__ == "__main__":
    sys.exit(main())
