"""Arithmetic efficiency of the fast sweep: FLOP lower bound / wall time / matmul rate.

The lower bound is counted from the architecture alone (`head_ablation_flops`), the
sweep's wall time comes from bench_sweep (the same run), and the matmul rate is
measured here, now, on exactly the GEMM shapes of one patched pass (all heads of a
layer batched), so the ratio holds on a machine shared with other jobs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    """The shape facts the FLOP count needs."""

    n_layers: int
    n_heads: int
    n_kv: int
    d_head: int
    d_model: int
    d_mlp: int
    gated: bool
    parallel: bool

    @classmethod
    def of(cls, w) -> "Arch":
        """From the engine's `Weights` (the key/value head count and gating from the HF modules)."""
        n_kv = getattr(w.model.config, "num_key_value_heads", None) or w.n_heads
        mlp = w.mlp_out[0]
        gated = any(hasattr(mlp, a) for a in ("gate_proj", "gate_up_proj"))
        return cls(w.n_layers, w.n_heads, n_kv, w.d_head, w.d_model, w.d_mlp, gated, w.parallel)


def layer_flops(a: Arch, seq_len: int) -> tuple[float, float]:
    """FLOPs per token of one full block (2 per multiply-add), split (attention, MLP).

    Attention: Q and O projections (n_heads·d_head wide), K and V (n_kv·d_head wide, GQA),
    then scores and the weighted sum over the causal prefix: a query at position p reads
    p + 1 keys, (seq_len + 1) / 2 on average. MLP: in and out, plus the gate if gated.
    Norms, activations, rotary and biases are O(d_model) and left out.
    """
    proj = 2 * a.d_model * a.d_head * (2 * a.n_heads + 2 * a.n_kv)
    mix = 2 * 2 * a.n_heads * a.d_head * (seq_len + 1) / 2
    mlp = 2 * a.d_model * a.d_mlp * (3 if a.gated else 2)
    return proj + mix, mlp


def head_ablation_flops(a: Arch, layer: int, seq_len: int) -> float:
    """Lower bound of FLOPs per token to ablate one head of `layer` and read the logit.

    Layers after `layer` run in full; in a sequential block the layer's own MLP reads the
    patched residual and runs too (in a parallel block it read the clean one); the logit
    needs only the correct token's unembedding column (2·d_model), never the full vocab.
    Upstream layers and the other heads of `layer` are cached from the clean run: 0.
    """
    attn, mlp = layer_flops(a, seq_len)
    later = (a.n_layers - 1 - layer) * (attn + mlp)
    return later + (0 if a.parallel else mlp) + 2 * a.d_model


def sweep_flops(a: Arch, heads: list[tuple[int, int]], n_rows: int, seq_len: int) -> float:
    """Lower bound for ablating every (layer, head) on `n_rows` rows (predictions only)."""
    tokens = n_rows * (seq_len - 1)
    return sum(head_ablation_flops(a, layer, seq_len) for layer, _ in heads) * tokens


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
    }
