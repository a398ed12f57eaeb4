"""What units and conditions cost: the ingest's sweep with layer units, and under a condition.

Three sweeps of one batch (`ablation_tables`, resample ablation, the ingest's defaults:
2% top tokens with repair, neuron and attention rows, units per pass as the ingest picks
them on this device), timed in one run, alternated (heads, units, conditioned, heads, …)
so each sees the same load, best of the rounds:

- heads: every head (270 on SmolLM2-135M);
- units: `heads,mlps,attn,blocks` (270 heads + 3 × 30 layer units);
- conditioned: every head outside the condition, given the condition (a head group).

Figures are ratios of those wall times, each beside what the FLOP model predicts
(bench_flops: a unit whose first layer is L costs the layers after L in full, plus the
layer-L MLP when it reads the patched residual; the conditioned baseline costs one
more such pass from the condition's first layer) and beside the engine's own work
measure: copies × layers run by the patched passes (each pass also runs one baseline
copy, and layer L itself in full).
"""

from __future__ import annotations

import os
import time

import numpy as np

N_ROWS = 1  # rows per batch: 1 × 128 tokens keeps 6 sweeps of SmolLM2 within minutes on 2 shared cores
ROUNDS = 2
UNITS = "heads,mlps,attn,blocks"
TARGET_UNITS = 1.2  # issue 20: units sweep / heads sweep
TARGET_GIVEN = 1.1  # issue 20: conditioned sweep / unconditioned sweep


def condition_spec(n_layers: int, n_heads: int) -> str:
    """The condition: the paper's backup pair L9H6+L9H8 where the model has it, else two heads of a middle layer."""
    if n_layers > 9 and n_heads > 8:
        return "L9H6+L9H8"
    return f"L{n_layers // 2}H0+L{n_layers // 2}H1"


def unit_flops(a, unit, seq_len: int) -> float:
    """The FLOP lower bound per token of ablating `unit` (bench_flops.head_ablation_flops, by first layer):
    a unit that replaces its first layer's MLP write (MLPn, BLOCKn) skips that MLP too."""
    import bench_flops

    flops = bench_flops.head_ablation_flops(a, unit.layer, seq_len)
    if unit.layer in unit.mlps() and not a.parallel:
        flops -= bench_flops.layer_flops(a, seq_len)[1]
    return flops


def engine_work(units, units_per_pass: int, n_layers: int) -> int:
    """Copies × layers the fast engine's passes run: per first layer, ceil(units / per pass) passes of
    (units in the pass + 1 baseline copy) copies, each from that layer to the last."""
    by_layer: dict[int, int] = {}
    for unit in units:
        by_layer[unit.layer] = by_layer.get(unit.layer, 0) + 1
    work = 0
    for layer, count in by_layer.items():
        passes = -(-count // units_per_pass)
        work += (count + passes) * (n_layers - layer)
    return work


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def run(ctx) -> dict:
    """Wall-time ratios units/heads and conditioned/unconditioned, with the FLOP model's and engine's."""
    import torch

    import bench_flops
    from selfrepair.ingest.ablate import FastBatch, ablation_tables
    from selfrepair.ingest.config import IngestConfig
    from selfrepair.ingest.jobs import heads_per_pass
    from selfrepair.store.labels import parse_unit, parse_units

    w = ctx.weights()
    cfg = IngestConfig()
    per_pass = heads_per_pass(cfg, "cpu", w)  # the ingest's default units per pass on this machine
    both = ctx.rows(2 * N_ROWS)
    rows, src_rows = both[:N_ROWS], both[N_ROWS:]
    n = N_ROWS * (ctx.seq_len - 1)
    heads = parse_units("heads", w.n_layers, w.n_heads)
    units = parse_units(UNITS, w.n_layers, w.n_heads)
    condition = parse_unit(condition_spec(w.n_layers, w.n_heads), w.n_layers, w.n_heads)
    given = [u for u in heads if not u.overlaps(condition, w.n_heads)]  # a unit never sits on top of itself
    rng = np.random.default_rng(0)
    keep = max(1, int(np.floor(cfg.top_p * n)))
    top_sets = {u.label: np.sort(rng.choice(n, keep, replace=False)) for u in units}

    sweeps = {"heads": (heads, None), "units": (units, None), "given": (given, condition)}
    rounds = 1 if ctx.quick else ROUNDS
    times: dict[str, list[float]] = {k: [] for k in sweeps}
    loads = [_load()]
    with torch.no_grad():
        ctx_b, src_b = FastBatch(w, rows), FastBatch(w, src_rows)  # the batch's clean runs, shared by every sweep

        def sweep(name):
            us, cond = sweeps[name]
            return ablation_tables(ctx_b, src_b, "resample", 0, us, rows, 0, top_sets, cfg.neurons_top_k,
                                   per_pass, w, attention_top_k=cfg.attention_top_k, condition=cond)

        last = [u for u in units if u.layer == w.n_layers - 1]  # warm-up: one layer's passes, both baselines
        ablation_tables(ctx_b, src_b, "resample", 0, last, rows, 0, top_sets, cfg.neurons_top_k, per_pass, w,
                        attention_top_k=cfg.attention_top_k, condition=condition)
        for _ in range(rounds):
            for name in sweeps:
                t0 = time.perf_counter()
                out = sweep(name)
                times[name].append(time.perf_counter() - t0)
                ctx.log(f"  {name}: {times[name][-1]:.1f} s, {out['ablation_effects'].num_rows:,} rows, "
                        f"load {_load():.1f}")
            loads.append(_load())

    a = bench_flops.Arch.of(w)
    flops = {name: sum(unit_flops(a, u, ctx.seq_len) for u in us) for name, (us, _) in sweeps.items()}
    flops["given"] += unit_flops(a, condition, ctx.seq_len)  # the condition-ablated baseline run
    work = {name: engine_work(us, per_pass, w.n_layers) for name, (us, _) in sweeps.items()}
    work["given"] += w.n_layers  # the baseline run: one full forward (clean_run with the condition)
    best = {k: min(v) for k, v in times.items()}
    return {
        "n_units": {k: len(v[0]) for k, v in sweeps.items()}, "units": UNITS, "condition": condition.label,
        "tokens": n, "units_per_pass": per_pass, "rounds": rounds, "times": times, "best_s": best,
        "loads": loads,
        "units_ratio": best["units"] / best["heads"],
        "units_ratio_rounds": [u / h for u, h in zip(times["units"], times["heads"])],
        "units_flop_ratio": flops["units"] / flops["heads"],
        "units_work_ratio": work["units"] / work["heads"],
        "given_ratio": best["given"] / best["heads"],
        "given_ratio_rounds": [g / h for g, h in zip(times["given"], times["heads"])],
        "given_flop_ratio": flops["given"] / flops["heads"],
        "given_work_ratio": work["given"] / work["heads"],
    }


def rows(r: dict, verdict, quick: bool) -> list[tuple[str, str, str, str]]:
    """The table lines (run.py's format)."""
    n = r["n_units"]
    judge = (lambda v, t: "not judged (--quick)") if quick else (lambda v, t: verdict(v, t, False))
    load = f"{min(r['loads']):.1f}–{max(r['loads']):.1f}"
    fmt = lambda k: f"{r['best_s'][k]:.1f} s (" + ", ".join(f"{t:.1f}" for t in r["times"][k]) + ")"  # noqa: E731
    return [
        (f"units sweep: {r['tokens']} tokens, {r['units_per_pass']} units per pass, best of {r['rounds']} "
         f"alternated rounds, load average {load}", "", "", ""),
        (f"heads ({n['heads']})", fmt("heads"), "", ""),
        (f"{r['units']} ({n['units']})", fmt("units"), "", ""),
        (f"heads given {r['condition']} ({n['given']})", fmt("given"), "", ""),
        ("units / heads wall time", f"{r['units_ratio']:.2f}×", f"≤ {TARGET_UNITS}×",
         judge(r["units_ratio"], TARGET_UNITS)),
        ("units / heads: FLOP model; engine copies × layers",
         f"{r['units_flop_ratio']:.2f}×; {r['units_work_ratio']:.2f}×", "", ""),
        ("conditioned / unconditioned wall time", f"{r['given_ratio']:.2f}×", f"≤ {TARGET_GIVEN}×",
         judge(r["given_ratio"], TARGET_GIVEN)),
        ("conditioned / unconditioned: FLOP model; engine copies × layers",
         f"{r['given_flop_ratio']:.2f}×; {r['given_work_ratio']:.2f}×", "", ""),
    ]
