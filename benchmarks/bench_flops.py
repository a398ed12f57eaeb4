"""Arithmetic efficiency of the fast sweep: FLOP lower bound / wall time / matmul rate.

The lower bound is counted from the architecture alone (`head_ablation_flops`), the
sweep's wall time comes from bench_sweep (the same run), and the matmul rate is
measured here, now, on exactly the GEMM shapes of one patched pass (all heads of a
layer batched), so the ratio holds on a machine shared with other jobs.
"""

from __future__ import annotations

# The FLOP model itself lives in store/flops.py (the ingest's plan states the output metrics' cost with it).
from selfrepair.store.flops import (Arch, head_ablation_flops, layer_flops, output_metric_flops,  # noqa: E402,F401
                                    sweep_flops)


def gemm_shapes(a: Arch, m: int) -> list[tuple[int, int, int, float]]:
    """(m, k, n, weight) for each GEMM of one block; weight = times per block."""
    q = a.n_heads * a.d_head
    kv = a.n_kv * a.d_head
    return [(m, a.d_model, q, 1), (m, a.d_model, kv, 2), (m, q, a.d_model, 1),
            (m, a.d_model, a.d_mlp, 2 if a.gated else 1), (m, a.d_mlp, a.d_model, 1)]


def matmul_rate(a: Arch, m: int, repeats: int = 5) -> float:
    """Measured float32 GEMM rate (FLOP/s) on one block's projection shapes, FLOP-weighted.

    Args:
        a: the architecture.
        m: GEMM rows, as in a patched pass: heads per pass × batch rows × seq_len.
        repeats: best-of count per shape.
    """
    import torch

    from common import best

    flops = seconds = 0.0
    for mm, k, n, weight in gemm_shapes(a, m):
        x, y = torch.randn(mm, k), torch.randn(k, n)
        out = torch.empty(mm, n)
        torch.mm(x, y, out=out)  # warm-up
        reps = max(1, min(100, int(5e8 // (2 * mm * k * n))))  # about 0.5 GFLOP per timing
        t = best(lambda: [torch.mm(x, y, out=out) for _ in range(reps)], repeats) / reps
        flops += weight * 2 * mm * k * n
        seconds += weight * t
    return flops / seconds


def calibrate(ctx) -> float:
    """The matmul rate for the sweep's shapes, measured now (FLOP/s)."""
    import bench_sweep

    a = Arch.of(ctx.weights())
    return matmul_rate(a, m=a.n_heads * bench_sweep.N_ROWS * ctx.seq_len, repeats=2)


def run(ctx) -> dict:
    """Arithmetic efficiency of the fast sweep measured by bench_sweep in this run.

    bench_sweep times the sweep in pieces (clean baselines, then one layer's heads at a
    time), each fast piece between two matmul calibrations. The efficiency is the time
    the FLOP lower bound would take at those adjacent matmul rates over the time taken.
    """
    import bench_sweep

    r = bench_sweep.paired_sweep(ctx, with_reference=False)
    a = Arch.of(ctx.weights())
    flops = sweep_flops(a, r["heads"], r["n_rows"], ctx.seq_len)
    patch = sum(r["patch_s"].values())
    return {
        "flop_lower_bound": flops,
        "fast_sweep_s": r["fast_s"],
        "patch_s": patch,
        "achieved_gflops": flops / r["fast_s"] / 1e9,
        "matmul_gflops": flops / r["fast_ideal_s"] / 1e9,  # the adjacent rates, time-weighted
        "efficiency": r["fast_ideal_s"] / r["fast_s"],
        "engine_efficiency": r["fast_ideal_s"] / patch,
        "clean_s": r["fast_clean_s"],  # outside the passes: the clean baselines, and the rest (tables)
    }
