"""Output metrics' cost: the sweep with them over the sweep without, against the FLOP model; memory flat.

The sweep is bench_sweep's (the ingest's own `ablation_tables`, resample ablation of every head
of the first and the last layer, whose mean depth is the model's; one row of the embedded corpus), run with and without
`--output-metrics`, interleaved layer by layer (without, with, without, with) so both see the
same load; each variant's time per layer is the best of its two runs. The FLOP model
(store/flops.py) predicts the ratio: (sweep lower bound + unembedding) / sweep lower bound, the
unembedding being 2·d_model·d_vocab per token of each head's copy (a pass needs no baseline copy
unless the model softcaps its logits; the baseline's own walk, once per batch, is left out by the
model but timed here: apart from the layers' passes, and counted once in the sweep with metrics, as
the ingest makes it once per batch for every layer). Target: measured ratio / predicted ratio ≤ 1.1.

Memory: the working set of one pass's metrics (`Baseline.ablated`) over a synthetic output head
(the embedded model's d_model, vocabularies of 49k, 131k and 262k, vocabulary chunks of 1k to
16k), as the growth of the process's resident memory during the call (Linux: a thread polls
/proc/self/statm, with every allocation above 64 KiB mapped and unmapped at once), beside what one unchunked [copy, token, vocabulary] float32
logits tensor alone would take.
"""

from __future__ import annotations

import time
from pathlib import Path

from selfrepair.store.labels import head_unit

SWEEP_LAYERS = 2
VOCABS = (49_152, 131_072, 262_144)
CHUNKS = (1024, 4096, 16_384)
MEM_COPIES, MEM_TOKENS = 4, 32  # one pass of 3 heads + its baseline copy, on 32 tokens


def _sweep(ctx) -> dict:
    import torch

    import bench_flops
    import bench_sweep
    from selfrepair.ingest.ablate import FastBatch, ablation_tables
    from selfrepair.store.flops import output_metric_flops

    w, rows, src_rows, _, _, top_sets = bench_sweep._setup(ctx)
    # The first and the last layer (their mean depth is the model's): the deepest pass and the shallowest.
    layers = bench_sweep.spread_layers(w.n_layers, SWEEP_LAYERS)
    heads = [(l, h) for l in layers for h in range(w.n_heads)]
    a = bench_flops.Arch.of(w)
    d_vocab = w.W_U.shape[1]
    tokens = bench_sweep.N_ROWS * (ctx.seq_len - 1)
    best = {False: {}, True: {}}
    walk = float("inf")
    with torch.no_grad():
        src = FastBatch(w, src_rows)
        # Untimed warm-up: a first sweep in a fresh process runs cold (weights and buffers first touched).
        ablation_tables(FastBatch(w, rows, metrics=True), src, "resample", 0, [head_unit(layers[0], 0)], rows, 0,
                        top_sets, 50, w.n_heads, w)
        for layer in layers:
            units = [head_unit(l, h) for l, h in heads if l == layer]
            for metrics in (False, True, False, True):
                ctx_ = FastBatch(w, rows, metrics=metrics)  # a fresh baseline each time
                if metrics:
                    # The baseline's own walk of the vocabulary (clean loss, entropy, E_p[W]) is made once per
                    # batch and shared by every layer's passes, as in the ingest: timed apart, counted once.
                    t0 = time.perf_counter()
                    ctx_.output()
                    walk = min(walk, time.perf_counter() - t0)
                t0 = time.perf_counter()
                ablation_tables(ctx_, src, "resample", 0, units, rows, 0, top_sets, 50, w.n_heads, w)
                t = time.perf_counter() - t0
                best[metrics][layer] = min(t, best[metrics].get(layer, t))
                ctx.log(f"  layer {layer} heads, output metrics {'on' if metrics else 'off'}: {t:.2f} s")
    sweep = bench_flops.sweep_flops(a, heads, bench_sweep.N_ROWS, ctx.seq_len)
    added = len(heads) * tokens * output_metric_flops(w.d_model, d_vocab, w.n_heads, w.softcap is not None)
    without, with_ = sum(best[False].values()), sum(best[True].values()) + walk
    rate = _unembed_rate(w.d_model, (w.n_heads + 1) * bench_sweep.N_ROWS * ctx.seq_len)
    return {"layers": layers, "n_heads": len(heads), "tokens": tokens, "d_vocab": d_vocab,
            "without_s": without, "with_s": with_, "walk_s": walk, "measured": with_ / without, "predicted": (sweep + added) / sweep,
            "sweep_gflop": sweep / 1e9, "added_gflop": added / 1e9,
            "added_s": with_ - without, "added_at_rate_s": added / rate, "unembed_gflops": rate / 1e9}


def _unembed_rate(d_model: int, m: int, chunk: int = 4096) -> float:
    """The float32 GEMM rate (FLOP/s) of one vocabulary chunk of a pass: [copies·tokens, d_model] @ [d_model, chunk]."""
    import torch

    from common import best

    x, W = torch.randn(m, d_model), torch.randn(chunk, d_model)
    torch.nn.functional.linear(x, W)
    return 2 * m * d_model * chunk / best(lambda: torch.nn.functional.linear(x, W), 5)


def _resident() -> int:
    """This process's resident memory in bytes (/proc/self/statm)."""
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakSampler:
    """The largest resident memory seen by a thread polling /proc/self/statm while the block runs."""

    def __enter__(self):
        import threading

        self.peak, self._stop = _resident(), threading.Event()

        def poll():
            while not self._stop.is_set():
                self.peak = max(self.peak, _resident())
                self._stop.wait(0.0005)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _resident())


def _memory(ctx, d_model: int | None = None) -> dict:
    """Peak memory growth of one pass's metrics, per (vocabulary, chunk) (d_model: the model's by default)."""
    import torch

    from selfrepair.ingest.output_metrics import Baseline, OutputHead
    from selfrepair.ingest.weights import Norm

    import ctypes

    # Every allocation above 64 KiB mapped and unmapped at once (glibc's threshold otherwise rises
    # and keeps freed chunks in the heap): the peak resident memory is then the live tensors' peak.
    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    d = d_model or ctx.weights().d_model
    g = torch.Generator().manual_seed(0)
    vocabs, chunks = (VOCABS, CHUNKS) if not ctx.quick else (tuple(v // 16 for v in VOCABS), tuple(c // 16 for c in CHUNKS))
    out = {}
    for vocab in vocabs:
        W = torch.randn(vocab, d, generator=g) * d ** -0.5
        norm = Norm("RMS", 1e-5, torch.ones(d), torch.zeros(d))
        resid = torch.randn(1, MEM_TOKENS, d, generator=g)
        abl = resid + 0.1 * torch.randn(MEM_COPIES, 1, MEM_TOKENS, d, generator=g)
        y = torch.randint(0, vocab, (1, MEM_TOKENS), generator=g)
        for chunk in chunks:
            head = OutputHead(norm, W, torch.zeros(vocab), chunk=chunk)
            with torch.no_grad():
                # From before the baseline's walk: an allocator that keeps freed blocks shows its peak too.
                before = _resident()
                with _PeakSampler() as sampler:
                    base = Baseline.of(head, resid, y)
                    t0 = time.perf_counter()
                    base.ablated(abl)
                    seconds = time.perf_counter() - t0
                peak = sampler.peak
            out[(vocab, chunk)] = {"peak_mib": (peak - before) / 2**20, "seconds": seconds}
            ctx.log(f"  d_vocab {vocab}, chunk {chunk}: peak +{(peak - before) / 2**20:.1f} MiB ({seconds:.2f} s)")
        del W
    full = {v: MEM_COPIES * MEM_TOKENS * v * 4 / 2**20 for v in vocabs}
    return {"cells": out, "unchunked_mib": full, "vocabs": vocabs, "chunks": chunks}


def _child_memory(quick: bool, d_model: int) -> dict:
    from common import Context

    try:
        return _memory(Context(quick=quick), d_model)
    except (OSError, AttributeError) as e:  # not Linux with glibc: the memory table is left out
        return {"error": str(e)}


def run(ctx) -> dict:
    """The sweep ratio against the FLOP model, and the metrics' working memory by vocabulary and chunk."""
    # In a fresh child process: the sweep's freed blocks would hide its peak, and its allocator setting
    # (`mallopt`) would slow the timed sweeps, which the ingest never runs under.
    import multiprocessing as mp

    d_model = ctx.weights().d_model
    with mp.get_context("spawn").Pool(1) as pool:  # spawn: a forked torch can hang
        memory = pool.apply(_child_memory, (ctx.quick, d_model))
    r = _sweep(ctx)
    r["memory"] = memory
    return r


def rows(r: dict, verdict, quick: bool) -> list[tuple[str, str, str, str]]:
    ratio = r["measured"] / r["predicted"]
    out = [
        (f"metrics sweep: heads of layers {','.join(map(str, r['layers']))} ({r['n_heads']}) × {r['tokens']} "
         f"tokens, d_vocab {r['d_vocab']:,}", "", "", ""),
        ("sweep without / with output metrics (best of 2 per layer; with: + the baseline's walk once)",
         f"{r['without_s']:.2f} s / {r['with_s']:.2f} s (walk {r['walk_s']:.2f} s)", "", ""),
        ("FLOP model: sweep lower bound + added unembedding",
         f"{r['sweep_gflop']:,.1f} + {r['added_gflop']:,.1f} GFLOP", "", ""),
        ("with / without: measured (predicted by the FLOP model)", f"{r['measured']:.3f}× ({r['predicted']:.3f}×)",
         "", ""),
        ("measured ratio / predicted ratio", f"{ratio:.3f}", "≤ 1.1", verdict(ratio, 1.1, False)),
        ("added time / added FLOPs at the unembedding GEMM rate",
         f"{r['added_s'] / r['added_at_rate_s']:.2f} ({r['added_s']:.2f} s / {r['added_at_rate_s']:.2f} s at "
         f"{r['unembed_gflops']:.1f} GFLOP/s)", "", ""),
    ]
    mem = r.get("memory", {})
    if "error" in mem:
        return out + [("metrics working memory", f"not measured ({mem['error']})", "", "")]
    out.append((f"metrics working memory, one pass ({MEM_COPIES} copies × {MEM_TOKENS} tokens): peak RSS growth",
                "", "", ""))
    for vocab in mem["vocabs"]:
        cells = ", ".join(f"chunk {c:,}: {mem['cells'][(vocab, c)]['peak_mib']:.1f} MiB" for c in mem["chunks"])
        out.append((f"  d_vocab {vocab:,} (unchunked logits alone: {mem['unchunked_mib'][vocab]:.0f} MiB)",
                    cells, "", ""))
    return out
