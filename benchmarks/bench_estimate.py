"""The disk estimate against a real store at pythia-410m's shape (random weights, a few hundred tokens).

Run on its own: `python benchmarks/bench_estimate.py [--tokens 256] [--heads L0,L23] [--out DIR]`.

A random GPT-NeoX with pythia-410m's shape (`bench_cuda.PYTHIA_410M`, rotary 25 %,
parallel residual) is saved with a byte tokenizer, `ingest --dry-run` estimates the store,
the real ingest writes it, and every table, array, the weights and the total are printed
beside their real sizes (sum of file sizes). Then the same estimator is printed for the
paper's run: 1 M tokens, all 384 heads, resample, seq_len 128, batch 32.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from bench_cuda import PYTHIA_410M, _save_neox  # noqa: E402
from estimate_check import compare, real_sizes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--heads", default="L0,L23")
    ap.add_argument("--ablations", default="resample")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from selfrepair.ingest.config import IngestConfig
    from selfrepair.ingest.runner import Ingest

    root = args.out or Path(tempfile.mkdtemp(prefix="bench-estimate-"))
    model = root / "pythia-410m-random"
    if not (model / "config.json").exists():
        _save_neox(model, PYTHIA_410M)
    settings = dict(model=str(model), store=root / "store", tokens=args.tokens, seq_len=args.seq_len,
                    batch_size=args.batch_size, heads=args.heads, ablations=args.ablations, corpus="embedded",
                    device="cpu", quiet=True)
    est = Ingest(IngestConfig(**settings, dry_run=True)).run().estimate
    t0 = time.perf_counter()
    result = Ingest(IngestConfig(**settings)).run()
    print(f"ingest: {time.perf_counter() - t0:.0f} s, {result.n_tokens} tokens, heads {args.heads}")
    rows, worst = compare(est, real_sizes(result.model_store.path))
    print("\n".join(rows))
    print(f"largest deviation {worst:+.1%}")
    paper(result)


def paper(result) -> None:
    """The estimator at the paper's scale: pythia-410m × 1 M tokens (what the README quotes)."""
    from selfrepair.store import estimate as E

    shape = E.ModelShape(n_layers=24, n_heads=16, d_model=1024, d_head=64, d_mlp=4096, d_vocab=50304,
                         n_norms=49, parallel=True)
    heads = tuple((l, h) for l in range(24) for h in range(16))
    for arrays, label in ((tuple(E.ARRAYS), "all"), (("z",), "z"), ((), "none")):
        run = E.RunCounts(n_rows=-(-1_000_000 // 127), preds_per_row=127, batch_size=32, draws=1,
                          resample_draws=1, heads=heads, top_p=0.02, neurons_top_k=50, arrays=arrays)
        est = E.estimate(shape, run)
        print(f"\npythia-410m × 1M tokens, resample, all heads, --activations {label}: {E.human(est.total)}")
        if label == "all":
            print("\n".join(est.lines()))


if __name__ == "__main__":
    main()
