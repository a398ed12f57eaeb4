"""What units and conditions cost: the ingest's sweep with layer units, and under a condition.

Three sweeps of one batch (`ablation_tables`, resample ablation, the ingest's defaults:
2% top tokens with repair, neuron and attention rows, units per pass as the ingest picks
them on this device), timed in one run, alternated (heads, units, conditioned, heads, …)
so each sees the same load, best of the rounds:

- heads: every head of the layers measured;
- units: `heads,mlps,attn,blocks` of those layers (their heads + ATTN, MLP and BLOCK units);
- conditioned: those heads outside the condition, given the condition (a head group, L9H6+L9H8).

The layers measured are bench_sweep's spread (0, 10, 19, 29 on SmolLM2-135M: mean depth =
the model's, so every ratio is the whole model's under the FLOP model, at 4/30 of the time
six sweeps of all 30 layers take on 2 shared cores); `--all-layers` (run on its own:
`python benchmarks/bench_units.py --all-layers`) measures all 270 heads + 90 layer units.

Figures are ratios of those wall times, each beside what the FLOP model predicts
(bench_flops: a unit whose first layer is L costs the layers after L in full, plus the
layer-L MLP when it reads the patched residual; the conditioned baseline costs one
more such pass from the condition's first layer) and beside the engine's own work
measure: copies × layers run by the patched passes (one copy per unit, from the layer after
its first; the first layer's attention is the clean output plus the heads' change).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

N_ROWS = 1  # rows per batch: 1 × 128 tokens keeps 6 sweeps of SmolLM2 within minutes on 2 shared cores
ROUNDS = 3
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
    """Copies × layers the fast engine's passes run: one copy per unit (no baseline copy), from the
    layer after its first to the last (the first layer's attention is not recomputed; its MLP, in a
    sequential block, is about one layer's worth shared by every copy and left out here). The number
    of passes does not change it: `units_per_pass` is kept for the callers."""
    return sum(n_layers - 1 - unit.layer for unit in units)


def _timed_batch():
    """FastBatch that adds each patched pass's and each conditioned baseline run's wall time to `spent`."""
    from selfrepair.ingest.ablate import FastBatch

    class Timed(FastBatch):
        spent = {"patch": 0.0, "baseline": 0.0}

        def patch(self, layer, heads, z_new, u):
            t0 = time.perf_counter()
            out = super().patch(layer, heads, z_new, u)
            Timed.spent["patch"] += time.perf_counter() - t0
            return out

        def conditioned(self, base):
            t0 = time.perf_counter()
            out = Timed(self.w, self.rows, self.dtype, base=base)
            Timed.spent["baseline"] += time.perf_counter() - t0
            return out

    return Timed


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def run(ctx, all_layers: bool = False, rounds: int = ROUNDS) -> dict:
    """Wall-time ratios units/heads and conditioned/unconditioned, with the FLOP model's and engine's."""
    import torch

    import bench_flops
    from selfrepair.ingest.ablate import ablation_tables
    from selfrepair.ingest.config import IngestConfig
    from selfrepair.ingest.jobs import heads_per_pass
    from selfrepair.store.labels import parse_unit, parse_units

    w = ctx.weights()
    cfg = IngestConfig()
    per_pass = heads_per_pass(cfg, "cpu", w)  # the ingest's default units per pass on this machine
    both = ctx.rows(2 * N_ROWS)
    rows, src_rows = both[:N_ROWS], both[N_ROWS:]
    n = N_ROWS * (ctx.seq_len - 1)
    from bench_sweep import spread_layers

    layers = list(range(w.n_layers)) if all_layers else spread_layers(w.n_layers)
    heads = [u for u in parse_units("heads", w.n_layers, w.n_heads) if u.layer in layers]
    units = [u for u in parse_units(UNITS, w.n_layers, w.n_heads) if u.layer in layers]
    condition = parse_unit(condition_spec(w.n_layers, w.n_heads), w.n_layers, w.n_heads)
    given = [u for u in heads if not u.overlaps(condition, w.n_heads)]  # a unit never sits on top of itself
    rng = np.random.default_rng(0)
    keep = max(1, int(np.floor(cfg.top_p * n)))
    top_sets = {u.label: np.sort(rng.choice(n, keep, replace=False)) for u in units}

    sweeps = {"heads": (heads, None), "units": (units, None), "given": (given, condition), "one_pass": (units, None)}
    # The ingest caps units per pass at n_heads (ingest/jobs.py), so a layer's 12 units take 2 passes, 2 baseline
    # copies; "one_pass" is the units sweep with room for all of a layer's units in one pass.
    pass_size = {name: per_pass for name in sweeps}
    pass_size["one_pass"] = max(per_pass, max(sum(u.layer == v.layer for v in units) for u in units))
    rounds = 1 if ctx.quick else rounds
    times: dict[str, list[float]] = {k: [] for k in sweeps}
    cpu: dict[str, list[float]] = {k: [] for k in sweeps}  # this process's CPU seconds: what the load cannot inflate
    parts: dict[str, list[dict]] = {k: [] for k in sweeps}  # per round: patched passes, baseline run, the rest
    loads = [_load()]
    # One thread: on 2 cores shared with other jobs, two-thread products stall on each other (README, Ray notes),
    # and the stalls scale with the number of operations, not the FLOPs, which would swamp the ratios.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        timed = _timed_batch()
        ctx_b, src_b = timed(w, rows), timed(w, src_rows)  # the batch's clean runs, shared by every sweep

        def sweep(name):
            us, cond = sweeps[name]
            return ablation_tables(ctx_b, src_b, "resample", 0, us, rows, 0, top_sets, cfg.neurons_top_k,
                                   pass_size[name], w, attention_top_k=cfg.attention_top_k, condition=cond)

        last = [u for u in units if u.layer == w.n_layers - 1]  # warm-up: one layer's passes, both baselines
        ablation_tables(ctx_b, src_b, "resample", 0, last, rows, 0, top_sets, cfg.neurons_top_k, per_pass, w,
                        attention_top_k=cfg.attention_top_k, condition=condition)
        for _ in range(rounds):
            for name in sweeps:
                timed.spent.update(patch=0.0, baseline=0.0)
                t0, c0 = time.perf_counter(), time.process_time()
                out = sweep(name)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                parts[name].append({**timed.spent, "rest": times[name][-1] - sum(timed.spent.values())})
                ctx.log(f"  {name}: {times[name][-1]:.1f} s, {out['ablation_effects'].num_rows:,} rows, "
                        f"load {_load():.1f}")
            loads.append(_load())
    torch.set_num_threads(threads_before)

    a = bench_flops.Arch.of(w)
    flops = {name: sum(unit_flops(a, u, ctx.seq_len) for u in us) for name, (us, _) in sweeps.items()}
    flops["given"] += unit_flops(a, condition, ctx.seq_len)  # the condition-ablated baseline run
    work = {name: engine_work(us, pass_size[name], w.n_layers) for name, (us, _) in sweeps.items()}
    work["given"] += w.n_layers  # the baseline run: one full forward (clean_run with the condition)
    best = {k: min(v) for k, v in times.items()}
    part = {k: v[int(np.argmin(times[k]))] for k, v in parts.items()}  # the parts of each best run
    # The condition's cost is per batch, the sweep's grows with the layers swept: scale the measured parts
    # to every head of the model (passes by copies × layers, the rest by units; the baseline run stays).
    every = parse_units("heads", w.n_layers, w.n_heads)
    every_given = [u for u in every if not u.overlaps(condition, w.n_heads)]
    k_h = engine_work(every, per_pass, w.n_layers) / engine_work(heads, per_pass, w.n_layers)
    k_g = engine_work(every_given, per_pass, w.n_layers) / engine_work(given, per_pass, w.n_layers)
    m_h, m_g = len(every) / len(heads), len(every_given) / len(given)
    ph, pg = part["heads"], part["given"]
    given_all = ((pg["patch"] * k_g + pg["baseline"] + pg["rest"] * m_g)
                 / (ph["patch"] * k_h + ph["baseline"] + ph["rest"] * m_h))
    return {
        "layers": layers, "n_units": {k: len(v[0]) for k, v in sweeps.items()}, "units": UNITS, "condition": condition.label,
        "tokens": n, "units_per_pass": per_pass, "rounds": rounds, "times": times, "best_s": best,
        "loads": loads, "parts": part,
        "cpu_s": cpu,
        "units_cpu_ratio": min(cpu["units"]) / min(cpu["heads"]),
        "given_cpu_ratio": min(cpu["given"]) / min(cpu["heads"]),
        "units_ratio": best["units"] / best["heads"],
        "units_ratio_rounds": [u / h for u, h in zip(times["units"], times["heads"])],
        "units_flop_ratio": flops["units"] / flops["heads"],
        "units_work_ratio": work["units"] / work["heads"],
        "one_pass_size": pass_size["one_pass"],
        "one_pass_ratio": best["one_pass"] / best["heads"],
        "one_pass_work_ratio": work["one_pass"] / work["heads"],
        "given_ratio": best["given"] / best["heads"],
        "given_ratio_rounds": [g / h for g, h in zip(times["given"], times["heads"])],
        "given_flop_ratio": flops["given"] / flops["heads"],
        "given_work_ratio": work["given"] / work["heads"],
        "given_all_heads_ratio": given_all, "n_every": len(every),
    }


def rows(r: dict, verdict, quick: bool) -> list[tuple[str, str, str, str]]:
    """The table lines (run.py's format)."""
    n = r["n_units"]
    judge = (lambda v, t: "not judged (--quick)") if quick else (lambda v, t: verdict(v, t, False))
    load = f"{min(r['loads']):.1f}–{max(r['loads']):.1f}"
    ph = {k: v["patch"] for k, v in r["parts"].items()}
    per_round = lambda k: ", ".join(f"{x:.2f}" for x in r[f"{k}_ratio_rounds"])  # noqa: E731
    fmt = lambda k: f"{r['best_s'][k]:.1f} s (" + ", ".join(f"{t:.1f}" for t in r["times"][k]) + ")"  # noqa: E731
    return [
        (f"units sweep: layers {','.join(map(str, r['layers']))}"
         if len(r["layers"]) < 8 else f"units sweep: {len(r['layers'])} layers", "", "", ""),
        (f"  {r['tokens']} tokens, 1 torch thread, {r['units_per_pass']} units per pass, best of {r['rounds']} "
         f"alternated rounds, load average {load}", "", "", ""),
        (f"heads ({n['heads']})", fmt("heads"), "", ""),
        (f"{r['units']} ({n['units']})", fmt("units"), "", ""),
        (f"heads given {r['condition']} ({n['given']})", fmt("given"), "", ""),
        (f"{r['units']}, {r['one_pass_size']} units per pass", fmt("one_pass"), "", ""),
        ("units / heads wall time, best (per round)", f"{r['units_ratio']:.2f}× ({per_round('units')})",
         f"≤ {TARGET_UNITS}×",
         judge(r["units_ratio"], TARGET_UNITS)),
        ("units / heads CPU time (1 thread), best", f"{r['units_cpu_ratio']:.2f}×", "", ""),
        ("units / heads: FLOP model; engine copies × layers",
         f"{r['units_flop_ratio']:.2f}×; {r['units_work_ratio']:.2f}×", "", ""),
        ("  patched passes alone (units / heads)", f"{ph['units'] / ph['heads']:.2f}×", "", ""),
        (f"  units / heads with {r['one_pass_size']} units per pass (a layer's units in one pass); engine",
         f"{r['one_pass_ratio']:.2f}×; {r['one_pass_work_ratio']:.2f}×", "", ""),
        ("conditioned / unconditioned wall time, best (per round)", f"{r['given_ratio']:.2f}× ({per_round('given')})",
         f"≤ {TARGET_GIVEN}×",
         judge(r["given_ratio"], TARGET_GIVEN)),
        ("conditioned / unconditioned CPU time (1 thread), best", f"{r['given_cpu_ratio']:.2f}×", "", ""),
        ("conditioned / unconditioned: FLOP model; engine copies × layers",
         f"{r['given_flop_ratio']:.2f}×; {r['given_work_ratio']:.2f}×", "", ""),
        ("  patched passes alone (conditioned / unconditioned)", f"{ph['given'] / ph['heads']:.2f}×", "", ""),
        (f"  estimated for all {r['n_every']} heads (passes scaled by copies × layers, the rest by units)",
         f"{r['given_all_heads_ratio']:.2f}×", "", ""),
        ("  conditioned baseline run; rest (tables, replacements)",
         f"{r['parts']['given']['baseline']:.2f} s; {r['parts']['given']['rest']:.2f} s "
         f"(unconditioned {r['parts']['heads']['rest']:.2f} s)", "", ""),
    ]


def main(argv=None) -> int:
    import argparse


    import torch

    from common import Context, threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a random 4-layer Llama: the code runs")
    parser.add_argument("--all-layers", action="store_true", help="every layer's units (270 heads + 90 layer units)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="alternated rounds (best of them)")
    args = parser.parse_args(argv)
    torch.set_num_threads(threads())
    ctx = Context(quick=args.quick, log=lambda *a: print(*a, file=sys.stderr, flush=True))
    from run import print_table, verdict

    r = run(ctx, all_layers=args.all_layers, rounds=args.rounds)
    print_table([("figure", "measured", "target", "result")] + rows(r, verdict, args.quick))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    raise SystemExit(main())
