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

N_ROWS = 2  # rows per batch, as in the lead's GFLOP/s measurement (2 × 128 tokens)
N_LAYERS_SPREAD = 6


def spread_layers(n_layers: int, k: int = N_LAYERS_SPREAD) -> list[int]:
    """`k` layers from first to last, evenly spaced (mean depth = the model's mean)."""
    if n_layers <= k:
        return list(range(n_layers))
    return sorted({round(i * (n_layers - 1) / (k - 1)) for i in range(k)})


def _setup(ctx):
    import torch

    w = ctx.weights()
    rows = ctx.rows(N_ROWS)
    src_rows = rows.roll(1, dims=0)  # resample: each row's source is another row
    layers = spread_layers(w.n_layers)
    heads = [(l, h) for l in layers for h in range(w.n_heads)]
    n = N_ROWS * (ctx.seq_len - 1)
    rng = np.random.default_rng(0)
    keep = max(1, int(np.floor(0.02 * n)))  # top_p 0.02, as the ingest default
    top_sets = {lh: np.sort(rng.choice(n, keep, replace=False)) for lh in heads}
    torch.set_num_threads(__import__("common").threads())
    return w, rows, src_rows, layers, heads, top_sets


def _sweep(make, w, rows, src_rows, heads, top_sets) -> float:
    """Wall time of one batch's sweep: both clean baselines plus every head's tables."""
    import torch

    from selfrepair.ingest.ablate import ablation_tables

    t0 = time.perf_counter()
    with torch.no_grad():
        ctx, src = make(rows), make(src_rows)
        ablation_tables(ctx, src, "resample", 0, heads, rows, 0, top_sets, 50, w.n_heads, w)
    return time.perf_counter() - t0


def fast_sweep(ctx, repeats: int = 2) -> dict:
    """The fast engine's sweep time (memoised: bench_flops reuses this run's figure)."""
    if "fast_sweep" not in ctx.memo:
        from selfrepair.ingest.ablate import FastBatch

        w, rows, src_rows, layers, heads, top_sets = _setup(ctx)
        t = min(_sweep(lambda r: FastBatch(w, r), w, rows, src_rows, heads, top_sets) for _ in range(repeats))
        ctx.memo["fast_sweep"] = {"seconds": t, "heads": heads, "layers": layers, "n_rows": N_ROWS}
    return ctx.memo["fast_sweep"]


def upstream_skip(ctx, repeats: int = 3) -> dict:
    """Time of one patched pass (all heads of layer L) against the FLOP model, per L."""
    import torch

    import bench_flops
    from common import best
    from selfrepair.ingest.ablate import FastBatch

    w, rows, src_rows, layers, _, _ = _setup(ctx)
    a = bench_flops.Arch.of(w)
    with torch.no_grad():
        fb, src = FastBatch(w, rows), FastBatch(w, src_rows)
        u = w.W_U.T[rows.roll(-1, dims=1)]
        heads = list(range(w.n_heads))
        fb.patch(0, heads, src.clean_z(0).permute(2, 0, 1, 3), u)  # warm-up, builds head projections
        out = {}
        for layer in layers:
            z_new = src.clean_z(layer).permute(2, 0, 1, 3)  # [head, batch, pos, d_head]
            out[layer] = best(lambda: fb.patch(layer, heads, z_new, u), repeats)
    t0, f0 = out[layers[0]], bench_flops.head_ablation_flops(a, layers[0], ctx.seq_len)
    return {layer: {"seconds": t, "time_ratio": t / t0,
                    "flop_ratio": bench_flops.head_ablation_flops(a, layer, ctx.seq_len) / f0,
                    "depth_ratio": (w.n_layers - layer) / w.n_layers}
            for layer, t in out.items()}


def run(ctx, repeats: int = 2) -> dict:
    """Fast vs reference throughput (head-token ablations per second) and the upstream skip."""
    from selfrepair.ingest.ablate import FastBatch, ReferenceBatch

    w, rows, src_rows, layers, heads, top_sets = _setup(ctx)
    bridge = ctx.model().bridge
    fast, ref = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine load
        fast.append(_sweep(lambda r: FastBatch(w, r), w, rows, src_rows, heads, top_sets))
        ref.append(_sweep(lambda r: ReferenceBatch(bridge, w, r), w, rows, src_rows, heads, top_sets))
    ctx.memo["fast_sweep"] = {"seconds": min(fast), "heads": heads, "layers": layers, "n_rows": N_ROWS}
    ablations = len(heads) * N_ROWS * (ctx.seq_len - 1)
    return {
        "layers": layers,
        "n_heads": len(heads),
        "tokens": N_ROWS * (ctx.seq_len - 1),
        "fast_s": min(fast),
        "reference_s": min(ref),
        "fast_per_s": ablations / min(fast),
        "reference_per_s": ablations / min(ref),
        "speedup": min(ref) / min(fast),
        "upstream": upstream_skip(ctx),
    }
