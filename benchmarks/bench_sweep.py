"""Sweep throughput: the fast engine against the reference engine, same model and tokens.

Both engines run the ingest's own batch sweep (`ablation_tables`: resample ablation of
each head, repair-source and neuron rows for its top tokens) on one batch of the
embedded corpus. The head subset is every head of a few layers spread evenly over the
depth, chosen so their mean depth equals the whole model's: the reference costs the
same per head at any depth, the fast engine's cost falls with depth, so a subset
skewed to early layers would flatter the reference.

The upstream skip: one patched pass of all heads of layer L costs the FLOPs of the
layers from L on, so its time should follow `head_ablation_flops(L)` ∝ (n_layers − L).
"""

from __future__ import annotations

import time

import numpy as np

N_ROWS = 1  # one row of 128 tokens per batch, so the reference finishes in time on 2 shared cores
N_LAYERS_SPREAD = 4


def spread_layers(n_layers: int, k: int = N_LAYERS_SPREAD) -> list[int]:
    """`k` layers from first to last, evenly spaced (mean depth = the model's mean)."""
    if n_layers <= k:
        return list(range(n_layers))
    return sorted({round(i * (n_layers - 1) / (k - 1)) for i in range(k)})


def _setup(ctx):
    w = ctx.weights()
    both = ctx.rows(2 * N_ROWS)
    rows, src_rows = both[:N_ROWS], both[N_ROWS:]  # resample: the source rows are other rows
    layers = spread_layers(w.n_layers)
    heads = [(l, h) for l in layers for h in range(w.n_heads)]
    n = N_ROWS * (ctx.seq_len - 1)
    rng = np.random.default_rng(0)
    keep = max(1, int(np.floor(0.02 * n)))  # top_p 0.02, as the ingest default
    top_sets = {lh: np.sort(rng.choice(n, keep, replace=False)) for lh in heads}
    return w, rows, src_rows, layers, heads, top_sets


def _timed(engine_cls):
    """`engine_cls` with each `patch` call's wall time recorded by layer (the upstream skip)."""
    class Timed(engine_cls):
        patch_s: dict = {}

        def patch(self, layer, heads, z_new, u):
            t0 = time.perf_counter()
            out = super().patch(layer, heads, z_new, u)
            Timed.patch_s[layer] = Timed.patch_s.get(layer, 0.0) + time.perf_counter() - t0
            return out

    Timed.patch_s = {}
    return Timed


def _sweep(make, w, rows, src_rows, heads, top_sets) -> float:
    """Wall time of one batch's sweep: both clean baselines plus every head's tables."""
    import torch

    from selfrepair.ingest.ablate import ablation_tables

    t0 = time.perf_counter()
    with torch.no_grad():
        ctx, src = make(rows), make(src_rows)
        ablation_tables(ctx, src, "resample", 0, heads, rows, 0, top_sets, 50, w.n_heads, w)
    return time.perf_counter() - t0


def fast_sweep(ctx, n_runs: int = 2, between=None) -> dict:
    """The fast engine's sweep, run `n_runs` times, with the matmul rate measured around each run.

    `between(i)` runs before run i (i ≥ 1): bench_sweep's reference run goes there, so
    the fast runs bracket it. Memoised in `ctx` so bench_flops reuses this run's figures.

    Returns:
        runs: per run, its seconds, its patched passes' seconds, and the matmul rate
        measured just before and just after it; seconds: the mean over runs; patch_s:
        each layer's patched-pass seconds (the minimum over runs).
    """
    if "fast_sweep" not in ctx.memo:
        import bench_flops
        from selfrepair.ingest.ablate import FastBatch

        w, rows, src_rows, layers, heads, top_sets = _setup(ctx)
        runs, patch = [], {}
        for i in range(n_runs):
            if i and between is not None:
                between(i)
            before = bench_flops.calibrate(ctx)
            engine = _timed(FastBatch)
            t = _sweep(lambda r: engine(w, r), w, rows, src_rows, heads, top_sets)
            runs.append({"seconds": t, "patch_s": sum(engine.patch_s.values()),
                         "matmul_before": before, "matmul_after": bench_flops.calibrate(ctx)})
            patch = {l: min(t, patch.get(l, t)) for l, t in engine.patch_s.items()}
        ctx.memo["fast_sweep"] = {"runs": runs, "seconds": sum(r["seconds"] for r in runs) / len(runs),
                                  "patch_s": patch, "heads": heads, "layers": layers, "n_rows": N_ROWS}
    return ctx.memo["fast_sweep"]


def upstream(ctx, patch_s: dict) -> dict:
    """Each layer's patched-pass time as a ratio to the first layer's, beside the FLOP model's."""
    import bench_flops

    w = ctx.weights()
    a = bench_flops.Arch.of(w)
    first = min(patch_s)
    f0 = bench_flops.head_ablation_flops(a, first, ctx.seq_len)
    return {layer: {"seconds": t, "time_ratio": t / patch_s[first],
                    "flop_ratio": bench_flops.head_ablation_flops(a, layer, ctx.seq_len) / f0,
                    "depth_ratio": (w.n_layers - layer) / w.n_layers}
            for layer, t in sorted(patch_s.items())}


def run(ctx) -> dict:
    """Fast vs reference throughput (head-token ablations per second) and the upstream skip.

    Order: fast, reference, fast; the mean of the two fast runs brackets the reference
    run in time, so both see the same machine load on average.
    """
    from selfrepair.ingest.ablate import ReferenceBatch

    w, rows, src_rows, layers, heads, top_sets = _setup(ctx)
    bridge = ctx.model().bridge
    ctx.memo.pop("fast_sweep", None)  # this run's fast sweeps must bracket its reference run
    ref = []
    fast = fast_sweep(ctx, 2, lambda i: ref.append(
        _sweep(lambda r: ReferenceBatch(bridge, w, r), w, rows, src_rows, heads, top_sets)))
    ablations = len(heads) * N_ROWS * (ctx.seq_len - 1)
    return {
        "layers": layers,
        "n_heads": len(heads),
        "tokens": N_ROWS * (ctx.seq_len - 1),
        "fast_s": fast["seconds"],
        "reference_s": ref[0],
        "fast_per_s": ablations / fast["seconds"],
        "reference_per_s": ablations / ref[0],
        "speedup": ref[0] / fast["seconds"],
        "upstream": upstream(ctx, fast["patch_s"]),
    }
