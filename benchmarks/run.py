"""Run the benchmarks and print one table: every figure, its target, PASS/MISS and margin.

Usage:
    python benchmarks/run.py [--quick] [--only sweep,flops,clean,queries,precision,cuda,ray,units,counterfactuals,metrics] [--output results.json]

Every figure is a ratio or a time measured in this run (see benchmarks/README.md), so
the table holds on a machine shared with other jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the bench modules import each other flat

import bench_clean  # noqa: E402
import bench_counterfactuals  # noqa: E402
import bench_cuda  # noqa: E402
import bench_flops  # noqa: E402
import bench_metrics  # noqa: E402
import bench_precision  # noqa: E402
import bench_queries  # noqa: E402
import bench_ray  # noqa: E402
import bench_sweep  # noqa: E402
import bench_units  # noqa: E402
from common import Context, threads  # noqa: E402

BENCHES = {"sweep": bench_sweep.run, "flops": bench_flops.run, "clean": bench_clean.run,
           "queries": bench_queries.run, "precision": bench_precision.run, "cuda": bench_cuda.run,
           "ray": bench_ray.run, "units": bench_units.run, "counterfactuals": bench_counterfactuals.run,
           "metrics": bench_metrics.run}


def verdict(value: float, target: float, at_least: bool) -> str:
    """PASS/MISS with the margin relative to the target (positive: better than the target)."""
    margin = value / target - 1 if at_least else 1 - value / target
    return f"{'PASS' if margin >= 0 else 'MISS'} ({margin:+.0%})"


def rows_for(name: str, r: dict, quick: bool) -> list[tuple[str, str, str, str]]:
    """(figure, measured, target, verdict) lines for one benchmark's results."""
    if name == "sweep":
        out = [
            (f"sweep heads: all of layers {','.join(map(str, r['layers']))} ({r['n_heads']}) × {r['tokens']} tokens", "", "", ""),
            ("fast engine, head-token ablations/s (mean of 2)", f"{r['fast_per_s']:,.0f} ({r['fast_s']:.2f} s)", "", ""),
            ("reference engine, head-token ablations/s", f"{r['reference_per_s']:,.0f} ({r['reference_s']:.2f} s)", "", ""),
            ("fast / reference throughput", f"{r['speedup']:.2f}×", "≥ 4.5×", verdict(r["speedup"], 4.5, True)),
        ]
        for layer, u in r["upstream"].items():
            out.append((f"patch of layer {layer}: time / time at layer {min(r['upstream'])}",
                        f"{u['time_ratio']:.2f} ({u['seconds'] * 1e3:.0f} ms)",
                        f"FLOP model {u['flop_ratio']:.2f}; (n−L)/n {u['depth_ratio']:.2f}", ""))
        return out
    if name == "flops":
        return [
            ("sweep FLOP lower bound", f"{r['flop_lower_bound'] / 1e9:,.1f} GFLOP", "", ""),
            ("fast sweep wall time (patched passes; best per layer)", f"{r['fast_sweep_s']:.2f} s ({r['patch_s']:.2f} s)", "", ""),
            ("FLOP bound / wall time", f"{r['achieved_gflops']:.1f} GFLOP/s", "", ""),
            ("matmul rate, same shapes, adjacent to each piece", f"{r['matmul_gflops']:.1f} GFLOP/s", "", ""),
            ("arithmetic efficiency (whole sweep)", f"{r['efficiency']:.0%}", "≥ 75%", verdict(r["efficiency"], 0.75, True)),
            ("arithmetic efficiency (patched passes only)", f"{r['engine_efficiency']:.0%}", "", ""),
            ("outside the passes: clean baselines; rest (tables, mean − best)",
             f"{r['clean_s']:.2f} s; {r['fast_sweep_s'] - r['patch_s'] - r['clean_s']:.2f} s", "", ""),
        ]
    if name == "clean":
        return [
            (f"clean pass, {r['rows']} rows ({r['tokens']} tokens): bare forward", f"{r['bare_s']:.2f} s", "", ""),
            ("clean pass with capture + writing", f"{r['capture_s']:.2f} s", "", ""),
            ("clean capture+write / bare forward", f"{r['overhead']:.2f}×", "", ""),
        ]
    if name == "queries":
        big = r["ablation_rows"] >= 20_000_000
        out = [(f"synthetic store: {r['store']}", f"{r['ablation_rows']:,} ablation rows", "", ""),
               ("Store.open", f"{r['open_s']:.2f} s", "", "")]
        for q in bench_queries.QUERIES:
            t = r[q]["best_s"]
            target, v = ("< 2 s", verdict(t, 2.0, False)) if q == "head_top_self_repair" and big else ("", "")
            out.append((f"query {q} (p=0.02), best (first)", f"{t:.2f} s ({r[q]['first_s']:.2f} s)", target, v))
        out.append(("on-disk bytes per ablation_effects row", f"{r['bytes_per_row']:.1f} B", "≤ 24 B",
                    verdict(r["bytes_per_row"], 24, False) if big else ""))
        return out
    if name == "precision":
        out = [(f"low precision vs float32: {r['heads']} heads × {r['tokens']} tokens, mean |error| / mean |value|",
                "", "", "")]
        for dt in ("bfloat16", "float16"):
            for col in bench_precision.COLUMNS:
                target = "≤ 2%" if col != "de" else ""
                out.append((f"{dt}: {col}", f"{r[f'{dt}_{col}']:.3%}", target,
                            verdict(r[f"{dt}_{col}"], 0.02, False) if target else ""))
            out.append((f"{dt}: LayerNorm identity, max abs error", f"{r[f'{dt}_ln_identity']:.1e}", "≤ 1e-4",
                        verdict(r[f"{dt}_ln_identity"], 1e-4, False)))
        return out
    if name == "cuda":
        if r["status"] != "measured":
            return [("CUDA: pythia-410m shape, 384 heads, s per M tokens", r["status"], "< 600 s", "")]
        out = [(f"CUDA {dt}: pythia-410m shape, 384 heads, s per M tokens", f"{r[f'{dt}_s_per_m_tokens']:.0f} s",
                "< 600 s", "" if quick else verdict(r[f"{dt}_s_per_m_tokens"], 600, False))
               for dt in ("float32", "bfloat16")]
        for col in ("d_logit", "de", "d_de_heads", "d_de_mlps"):
            out.append((f"bfloat16 vs float32 error, {col}",
                        f"max abs {r[f'bf16_max_abs_err_{col}']:.3g}, mean rel {r[f'bf16_rel_err_{col}']:.2%}", "", ""))
        return out
    if name == "ray":
        return bench_ray.rows(r, quick)
    if name == "units":
        return bench_units.rows(r, verdict, quick)
    if name == "counterfactuals":
        return bench_counterfactuals.rows(r, verdict, quick)
    if name == "metrics":
        return bench_metrics.rows(r, verdict, quick)
    raise KeyError(name)


def print_table(lines: list[tuple[str, str, str, str]]) -> None:
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in under a minute")
    parser.add_argument("--only", default=",".join(BENCHES),
                        help=f"comma-separated subset of {','.join(BENCHES)}")
    parser.add_argument("--output", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    asked = {n.strip() for n in args.only.split(",") if n.strip()}
    unknown = sorted(asked - set(BENCHES))
    if unknown:
        parser.error(f"--only: unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    names = [n for n in BENCHES if n in asked]  # fixed order: flops reuses sweep's fast runs
    import torch

    torch.set_num_threads(threads())
    ctx = Context(quick=args.quick, log=lambda *a: print(*a, file=sys.stderr, flush=True))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = (f"selfrepair benchmarks{' (--quick)' if args.quick else ''}: {ctx.model_name}, "
              f"{os.cpu_count()} cores, torch {torch.__version__} with {threads()} threads, load average {load:.1f}")
    results, t0 = {}, time.perf_counter()
    for name in names:
        ctx.log(f"[{name}] running…")
        t = time.perf_counter()
        results[name] = BENCHES[name](ctx)
        ctx.log(f"[{name}] done in {time.perf_counter() - t:.1f} s")
    lines = [("figure", "measured", "target", "result")]
    for name in names:
        # --quick sizes say nothing about the targets: show them, judge none.
        lines += [(f, m, t, "not judged (--quick)" if args.quick and v else v)
                  for f, m, t, v in rows_for(name, results[name], args.quick)]
    print(header)
    print_table(lines)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.output:
        args.output.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
