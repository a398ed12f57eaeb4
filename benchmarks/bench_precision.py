"""Low-precision sweeps against float32 on the embedded model: error of every stored effect.

`--dtype bfloat16|float16` runs only the sweep's matrix products in low precision; the
clean pass, residual stream, norms and differences stay float32. Each figure is the mean
absolute error of a column of `ablation_effects` over the mean magnitude of its float32
value (target ≤ 2%), plus the LayerNorm identity's largest error on the low-precision
rows (target ≤ 1e-4). Runs on the CPU too, so it is measured on every machine.
"""

from __future__ import annotations

import numpy as np

COLUMNS = ("d_logit", "de", "d_de_heads", "d_de_mlps")
N_ROWS = 2


def _ln_identity_error(tables, clean_logit, scale, b_u, de_clean) -> float:
    """max |sr_ln − (s/s_abl − 1)·(logit_abl − b_U)·s_abl/s| over the rows, from the rows alone."""
    t = tables
    d_logit, s_abl = t.column("d_logit").to_numpy(), t.column("ln_scale").to_numpy()
    sr = d_logit - (t.column("de").to_numpy() - de_clean)
    sr_ln = sr - t.column("d_de_heads").to_numpy() - t.column("d_de_mlps").to_numpy()
    closed = (scale / s_abl - 1) * (clean_logit + d_logit - b_u) * s_abl / scale
    return float(np.abs(sr_ln - closed).max())


def run(ctx) -> dict:
    """Relative errors of bfloat16 and float16 sweeps against float32, same heads and tokens."""
    import torch

    from bench_cuda import sweep_tables
    from bench_sweep import spread_layers
    from selfrepair.ingest.ablate import FastBatch

    w = ctx.weights()
    both = ctx.rows(2 * N_ROWS)
    rows, src = both[:N_ROWS], both[N_ROWS:]
    heads = [(l, h) for l in spread_layers(w.n_layers) for h in range(w.n_heads)]
    out = {"heads": len(heads), "tokens": N_ROWS * (ctx.seq_len - 1)}
    with torch.no_grad():
        tables = {name: sweep_tables(w, low, rows, src, heads, {})["ablation_effects"]
                  for name, low in (("float32", None), ("bfloat16", torch.bfloat16), ("float16", torch.float16))}
        clean = FastBatch(w, rows)
        preds = ctx.seq_len - 1
        y = rows.roll(-1, dims=1)
        u = w.target_columns(y)
        s = clean.clean.scale[:, :preds].reshape(-1).numpy()
        logit = (clean.clean_logit(u)[:, :preds] + w.b_U[y][:, :preds]).reshape(-1).numpy()
        b_u = w.b_U[y][:, :preds].reshape(-1).numpy()
        ou = torch.einsum("lhdm,bpm->lbphd", w.W_O_eff, u)
        de = (clean.clean.z * ou).sum(-1)[:, :, :preds] / clean.clean.scale[:, :preds, None]  # [l, b, p, h]
    for name in ("bfloat16", "float16"):
        a, b = tables["float32"], tables[name]
        for col in COLUMNS:
            x, z = a.column(col).to_numpy(), b.column(col).to_numpy()
            out[f"{name}_{col}"] = float(np.abs(x - z).mean() / max(np.abs(x).mean(), 1e-30))
        errs = []
        per_head = b.num_rows // len(heads)
        for i, (layer, head) in enumerate(heads):
            part = b.slice(i * per_head, per_head)
            assert part.column("layer")[0].as_py() == layer and part.column("head")[0].as_py() == head
            errs.append(_ln_identity_error(part, logit, s, b_u, de[layer, :, :, head].reshape(-1).numpy()))
        out[f"{name}_ln_identity"] = max(errs)
    return out
