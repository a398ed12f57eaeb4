"""The full sweep at the paper's scale on CUDA: pythia-410m's shape, random weights.

A randomly initialised GPT-NeoX with pythia-410m's shape (24 layers × 16 heads, d_model
1024, d_mlp 4096, parallel attention + MLP, rotary 25 %, 50k vocab) is booted through
`TransformerBridge.boot_transformers` from a folder saved with a tokenizer, as the tests
build their tiny models. The fast sweep (resample ablation of all 384 heads, the
ingest's `ablation_tables`) runs on 128-token rows and is reported as seconds per
million tokens; the same batch in bfloat16 is compared with float32. Speed does not
depend on the weights' values, so random weights measure the real model's cost.
"""

from __future__ import annotations

import time

SEQ_LEN = 128
BATCH_ROWS = 32  # rows per batch (one pass holds 16 head copies of the batch)
N_BATCHES = 4


PYTHIA_410M = {"vocab_size": 50304, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
               "intermediate_size": 4096}


def _save_neox(folder, shape: dict):
    """Save a random GPT-NeoX of `shape` (parallel residual, rotary 25 %) and a tokenizer."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from selfrepair.ingest.synthetic import byte_tokenizer

    torch.manual_seed(0)
    config = GPTNeoXConfig(**shape, max_position_embeddings=2048, rotary_pct=0.25,
                           use_parallel_residual=True, bos_token_id=256, eos_token_id=256)
    GPTNeoXForCausalLM(config).eval().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def sweep_tables(w, dtype, rows, src_rows, heads, top_sets):
    """One batch's tables: both clean baselines, then all heads, a layer's heads per pass.

    `dtype`: the dtype of the matrix products (None: float32), as `--dtype` gives it.
    """
    from selfrepair.ingest.ablate import FastBatch, ablation_tables
    from selfrepair.store.labels import head_unit

    ctx, src = FastBatch(w, rows, dtype), FastBatch(w, src_rows, dtype)
    units = [head_unit(l, h) for l, h in heads]
    return ablation_tables(ctx, src, "resample", 0, units, rows, 0, top_sets, 50, w.n_heads, w)


def run(ctx) -> dict:
    """Seconds per million tokens for all 384 heads, and bfloat16 error against float32."""
    import torch

    if not torch.cuda.is_available():
        return {"status": "not measured: no CUDA device"}
    if ctx.quick:
        return measure(ctx, "cuda", dict(PYTHIA_410M, num_hidden_layers=2), batch_rows=4, n_batches=1)
    return measure(ctx, "cuda", PYTHIA_410M, BATCH_ROWS, N_BATCHES)


def measure(ctx, device: str, shape: dict, batch_rows: int, n_batches: int) -> dict:
    """The sweep on a random GPT-NeoX of `shape` on `device` (run() passes cuda)."""
    import numpy as np
    import torch

    from selfrepair.ingest.models import load_model
    from selfrepair.ingest.weights import read_weights
    from selfrepair.store.labels import head_label

    # load_model boots a local folder with TransformerBridge.boot_transformers(path,
    # hf_model=..., tokenizer=...) and enable_compatibility_mode(), as the ingest does.
    model = load_model(str(_save_neox(ctx.tmp / "neox-bench", shape)), device)
    w32 = read_weights(model.hf_model, SEQ_LEN)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    heads = [(l, h) for l in range(w32.n_layers) for h in range(w32.n_heads)]
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, shape["vocab_size"], (n_batches + 1, batch_rows, SEQ_LEN), generator=gen).to(device)
    n = batch_rows * (SEQ_LEN - 1)
    top = np.arange(max(1, int(0.02 * n)))  # the top-p% rows' cost does not depend on which tokens
    top_sets = {head_label(*lh): top for lh in heads}
    out = {"heads": len(heads), "tokens_per_batch": n}
    with torch.no_grad():
        for name, dtype in (("float32", None), ("bfloat16", torch.bfloat16)):
            sweep_tables(w32, dtype, rows[0], rows[1], heads, top_sets)  # warm-up
            sync()
            t0 = time.perf_counter()
            for b in range(n_batches):
                sweep_tables(w32, dtype, rows[b], rows[b + 1], heads, top_sets)
            sync()
            out[f"{name}_s_per_m_tokens"] = (time.perf_counter() - t0) / (n_batches * n) * 1e6
        a = sweep_tables(w32, None, rows[0], rows[1], heads, top_sets)["ablation_effects"]
        b = sweep_tables(w32, torch.bfloat16, rows[0], rows[1], heads, top_sets)["ablation_effects"]
    for col in ("d_logit", "de", "d_de_heads", "d_de_mlps"):
        x, y = a.column(col).to_numpy(), b.column(col).to_numpy()
        out[f"bf16_max_abs_err_{col}"] = float(np.abs(x - y).max())
        out[f"bf16_rel_err_{col}"] = float(np.abs(x - y).mean() / max(np.abs(x).mean(), 1e-30))
    out["status"] = "measured"
    return out
