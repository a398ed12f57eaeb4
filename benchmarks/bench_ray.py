"""Ray executor throughput: 1 Ray worker against the in-process executor, and 2 workers.

Both executors get the same ablation units — batches of one 128-token row of the
embedded corpus, resample ablation of every head of layers 10 and 29 (18 heads of the
embedded SmolLM2-135M), repair-source and neuron rows for a random 2% of tokens — and
the same store: each computes the units, writes their Parquet files and the ingest's
process commits them through the Writer (`ingest/executors.py`, `ingest/ray_pool.py`).
The model is loaded once per process before timing (in the actors too: a warm-up unit),
so the figures are the sweep's steady state. In-process and 1-worker runs alternate,
best of 2 each; the 1-worker actor gets every core, as the in-process run does.

Also measured, for the scaling notes: seconds per unit, the driver's commit time per
unit (the only serial part of a Ray run) and the Parquet bytes written per unit.

Run alone: python benchmarks/bench_ray.py [--quick]
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

N_UNITS = 4  # batches of one row per timed run
LAYERS = (10, 29)
REPEATS = 2


def _units(ctx, w, rows: np.ndarray, tag: str) -> list:
    from selfrepair.ingest.jobs import AblationJob
    from selfrepair.store.labels import head_unit, units_spec
    from selfrepair.store.plan import AblationWork

    layers = range(w.n_layers) if ctx.quick else LAYERS
    heads = [head_unit(l, h) for l in layers for h in range(w.n_heads)]
    preds = ctx.seq_len - 1
    rng = np.random.default_rng(0)
    out = []
    for b in range(N_UNITS):
        t0 = b * preds
        top = {u.label: np.sort(t0 + rng.choice(preds, max(1, int(0.02 * preds)), replace=False)) for u in heads}
        pair = np.array([(b + 1) % N_UNITS])
        work = AblationWork("resample", 0, (b, b + 1), heads, units_spec(heads),
                            f"abl-bench-{tag}-{b:04d}")
        out.append(AblationJob(work, rows[b:b + 1], pair, rows[pair], top, N_UNITS * preds, len(heads) * preds))
    return out


def _timed_run(executor, units, writer) -> dict:
    """Compute and commit `units`; returns wall seconds, commit seconds and bytes written."""
    stats = {"commit_s": 0.0, "bytes": 0}

    def commit(unit, entry):
        t = time.perf_counter()
        writer.commit_written(unit.shard_id, entry)
        stats["commit_s"] += time.perf_counter() - t
        stats["bytes"] += sum(f["bytes"] for f in entry["files"].values())

    t0 = time.perf_counter()
    executor.run(units, commit, lambda n: None)
    stats["wall_s"] = time.perf_counter() - t0
    return stats


def run(ctx) -> dict:
    try:
        import ray
    except ImportError:
        return {"status": "not measured: ray is not installed (pip install -e '.[ray]')"}
    from selfrepair.ingest.config import IngestConfig
    from selfrepair.ingest.executors import InProcess
    from selfrepair.ingest.ray_pool import RayPool
    from selfrepair.store.model_store import ModelStore
    from selfrepair.store.writer import Writer

    model, w = ctx.model(), ctx.weights()
    rows = ctx.rows(N_UNITS).numpy()
    name = str(ctx.tmp / "tiny-llama") if ctx.quick else "smollm2-135m"
    cfg = IngestConfig(model=name, store=ctx.tmp / "ray-bench", tokens=N_UNITS * (ctx.seq_len - 1),
                       seq_len=ctx.seq_len, batch_size=1, corpus="embedded", device="cpu", quiet=True)
    ms = ModelStore(ctx.tmp / "ray-bench" / "model")
    writer = Writer.open(ms)
    writer.create({"model": {"n_layers": w.n_layers, "n_heads": w.n_heads}, "n_tokens": cfg.n_tokens})
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 object_store_memory=100 * 2**20, logging_level="WARNING")
    n = 0

    def units():
        nonlocal n
        n += 1
        return _units(ctx, w, rows, str(n))

    out = {"status": "measured", "units": N_UNITS, "per_unit": units()[0].size, "cores": os.cpu_count(),
           "layers": "all" if ctx.quick else ",".join(map(str, LAYERS))}
    try:
        inproc = InProcess(cfg, model, w, ms)
        _timed_run(inproc, units()[:1], writer)  # warm-up: heads per pass, first-call costs
        t = time.perf_counter()
        pool = RayPool(replace(cfg, executor="ray", workers=1), ms)
        _timed_run(pool, units()[:1], writer)  # the actor loads the model
        out["ray_start_s"] = time.perf_counter() - t
        runs = {"inprocess": [], "ray1": []}
        for _ in range(REPEATS):
            runs["inprocess"].append(_timed_run(inproc, units(), writer))
            runs["ray1"].append(_timed_run(pool, units(), writer))
        pool.close()
        pool = RayPool(replace(cfg, executor="ray", workers=2), ms)
        _timed_run(pool, units()[:2], writer)  # both actors load the model
        runs["ray2"] = [_timed_run(pool, units(), writer)]
        pool.close()
        import torch

        # Each of the 2 workers runs torch on one core: the same ingest in-process on one thread, for comparison.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            runs["inprocess_1thread"] = [_timed_run(inproc, units(), writer)]
        finally:
            torch.set_num_threads(threads)
    finally:
        writer.close()
        if started:
            ray.shutdown()
    total = N_UNITS * out["per_unit"]
    for key, rs in runs.items():
        best = min(rs, key=lambda r: r["wall_s"])
        out[key] = {"per_s": total / best["wall_s"], "wall_s": best["wall_s"],
                    "commit_ms_per_unit": 1e3 * best["commit_s"] / N_UNITS, "bytes_per_unit": best["bytes"] / N_UNITS}
    out["overhead"] = 1 - out["ray1"]["per_s"] / out["inprocess"]["per_s"]
    out["ray2_vs_inprocess"] = out["ray2"]["per_s"] / out["inprocess"]["per_s"]
    unit_s = out["inprocess"]["wall_s"] / N_UNITS
    commit_s = out["ray1"]["commit_ms_per_unit"] / 1e3
    out["unit_s"] = unit_s
    out["driver_bound_workers"] = unit_s / max(commit_s, 1e-6)  # workers one committer keeps busy
    return out


def rows(r: dict, quick: bool) -> list[tuple[str, str, str, str]]:
    """The benchmark table's lines (run.py prints them)."""
    if r["status"] != "measured":
        return [("Ray executor, 1 worker vs in-process", r["status"], "overhead ≤ 10%", "")]
    from run import verdict

    label = f"{r['units']} units × {r['per_unit']:,} head-token ablations"
    return [
        (f"Ray executor: {label} (resample, all heads of layers {r['layers']})", "", "", ""),
        ("in-process, head-token ablations/s (best of 2)", f"{r['inprocess']['per_s']:,.0f} ({r['inprocess']['wall_s']:.2f} s)", "", ""),
        ("Ray, 1 worker, head-token ablations/s (best of 2)", f"{r['ray1']['per_s']:,.0f} ({r['ray1']['wall_s']:.2f} s)", "", ""),
        ("Ray 1-worker overhead vs in-process", f"{r['overhead']:+.1%}", "≤ 10%",
         "not judged (--quick)" if quick else verdict(max(r["overhead"], 1e-9), 0.10, False)),
        (f"Ray, 2 workers on {r['cores']} cores, head-token ablations/s", f"{r['ray2']['per_s']:,.0f} "
         f"({r['ray2_vs_inprocess']:.2f}× in-process)", "as measured", ""),
        ("in-process on 1 torch thread (each 2-worker actor has one core)",
         f"{r['inprocess_1thread']['per_s']:,.0f} ({r['inprocess_1thread']['wall_s']:.2f} s)", "", ""),
        ("Ray start + actor model load (1 worker)", f"{r['ray_start_s']:.1f} s", "", ""),
        ("per unit: compute+write / driver commit / Parquet bytes",
         f"{r['unit_s']:.2f} s / {r['ray1']['commit_ms_per_unit']:.1f} ms / {r['ray1']['bytes_per_unit'] / 1e3:.0f} kB", "", ""),
        ("workers one committer keeps busy (unit time / commit time)", f"{r['driver_bound_workers']:,.0f}", "", ""),
    ]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    import torch

    from common import Context, threads
    from run import print_table

    torch.set_num_threads(threads())
    quick = "--quick" in sys.argv
    ctx = Context(quick=quick, log=lambda *a: print(*a, file=sys.stderr, flush=True))
    print_table([("figure", "measured", "target", "result"), *rows(run(ctx), quick)])
