"""Clean pass overhead: capture, decomposition and writing against a bare forward.

The capture side is the runner's clean phase, step for step through public APIs:
`run_clean` (hooked forward, DEs, tables, token-major arrays), the Zarr region writes
with their chunk checksums, the Parquet shard files and the commit record. The bare
side is `bridge(rows)` on the same bridge and rows. Same batches, interleaved repeats.
"""

from __future__ import annotations

import shutil
import time

N_ROWS, BATCH = 4, 2  # two shards of 2 rows × 128 tokens (kept small: 2 shared cores)


def _capture(ctx, rows, folder) -> float:
    """The runner's clean phase into a fresh model folder; returns its wall time."""
    from selfrepair.ingest.clean import TokenStrings, run_clean
    from selfrepair.store.model_store import ModelStore
    from selfrepair.store.writer import Writer

    model, w = ctx.model(), ctx.weights()
    preds = ctx.seq_len - 1
    n_tokens = len(rows) * preds
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    folder.mkdir(parents=True)
    writer = Writer.open(ModelStore(folder))
    writer.create({"model": model.facts(w), "n_tokens": n_tokens})
    writer.prepare_arrays({
        "resid_pre": (n_tokens, w.n_layers, w.d_model), "resid_final": (n_tokens, w.d_model),
        "z": (n_tokens, w.n_layers, w.n_heads, w.d_head), "norm_scales": (n_tokens, len(w.norm_names)),
        "mlp_post_final": (n_tokens, w.d_mlp)}, BATCH * preds, "float16", {})
    strings = TokenStrings(model.tokenizer)
    for r0 in range(0, len(rows), BATCH):
        r1 = min(r0 + BATCH, len(rows))
        out = run_clean(w, rows[r0:r1], r0, strings, True)
        writer.commit_clean(f"clean-{r0:08d}-{r1:08d}", (r0, r1), (r0 * preds, r1 * preds), out.tables, out.arrays)
    writer.close()
    return time.perf_counter() - t0


def _bare(ctx, rows) -> float:
    """The bridge's plain forward (logits) over the same batches."""
    import torch

    bridge = ctx.model().bridge
    t0 = time.perf_counter()
    with torch.no_grad():
        for r0 in range(0, len(rows), BATCH):
            bridge(rows[r0:r0 + BATCH])
    return time.perf_counter() - t0


def run(ctx, repeats: int = 2) -> dict:
    """Clean phase (capture + write) time over bare forward time, best of `repeats`."""
    import torch

    from common import threads

    torch.set_num_threads(threads())
    rows = ctx.rows(N_ROWS)
    _bare(ctx, rows[:BATCH])  # warm-up
    bare, cap = [], []
    for i in range(repeats):
        bare.append(_bare(ctx, rows))
        cap.append(_capture(ctx, rows, ctx.tmp / "clean-store" / str(i)))
    return {"rows": N_ROWS, "tokens": N_ROWS * (ctx.seq_len - 1), "bare_s": min(bare),
            "capture_s": min(cap), "overhead": min(cap) / min(bare)}
