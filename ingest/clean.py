"""The clean pass: the engine's float32 clean run of each batch, decomposed into DEs.

Every DE is `(component · u) / s`, with `u` the correct token's processed unembedding
column and `s` the final norm's scale. `de_other` is computed from the embeddings and
the attention biases directly, never as a remainder, so the identity
Σ DE = logit − b_U[y] is a real check of the store.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from selfrepair.ingest.engine import CleanState, clean_run, head_projections
from selfrepair.ingest.weights import Weights


class TokenStrings:
    """Decoded token strings, cached per id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, ids: np.ndarray) -> list[str]:
        out = []
        for i in ids.tolist():
            s = self.cache.get(i)
            if s is None:
                s = self.cache[i] = self.tokenizer.decode([i])
            out.append(s)
        return out


def vocab_table(tokenizer, d_vocab: int) -> pa.Table:
    """The `vocab` rows: every token id of the unembedding and its decoded string (as `tokens` shows it)."""
    n = min(d_vocab, len(tokenizer))
    strings = TokenStrings(tokenizer)(np.arange(n)) + [""] * (d_vocab - n)  # ids the tokenizer never makes
    return pa.table({"token_id": np.arange(d_vocab, dtype=np.int32), "token_str": strings})


@dataclass
class CleanBatch:
    """The clean pass over one batch of rows: Parquet tables and token-major arrays."""

    tables: dict[str, pa.Table]
    arrays: dict[str, np.ndarray]


def run_clean(w: Weights, rows: torch.Tensor, row0: int, strings: TokenStrings, with_arrays: bool,
              state: CleanState | None = None, metrics: bool = True) -> CleanBatch:
    """Run and decompose the clean forward for `rows` [batch, seq_len] starting at row `row0`.

    `metrics`: also the output distribution's entropy (`tokens.entropy`, `--output-metrics`).

    Returns:
        Tables `tokens`, `head_effects`, `mlp_effects` and, when asked, the Zarr arrays,
        for the batch's (seq_len - 1) predictions per row.
    """
    n_layers, n_heads = w.n_layers, w.n_heads
    st = state if state is not None else clean_run(w, rows)
    batch, seq = rows.shape
    preds = seq - 1
    y = rows[:, 1:]  # [batch, preds] correct next tokens
    keep = lambda t: t[..., :preds, :] if t.dim() > 2 else t[:, :preds]  # noqa: E731 - last position predicts nothing
    u = w.target_columns(y)  # [batch, preds, d_model]
    s = keep(st.scale)  # [batch, preds]
    b_u = w.b_U[y]
    logit = (keep(st.resid_final) * u).sum(-1) / s + b_u
    logp = torch.log_softmax(keep(st.logits), dim=-1)
    loss = -logp.gather(-1, y[..., None])[..., 0]  # the model's own logits (softcap included), float32
    # Embeddings and every attention bias (b_O with the folded value biases) are neither a head nor an MLP.
    other = st.resid_pre[0][:, :preds] + st.attn_bias_write(w)[:, :, :preds].sum(0)
    de_other = (other * u).sum(-1) / s
    z = st.z[:, :, :preds]  # [layer, batch, preds, head, d_head]
    # head DE: z_h · (W_O_eff[l, h] @ u) / s_post / s, one dot product per token.
    head_de = (z * head_projections(w, u)).sum(-1)  # [layer, batch, preds, head]
    if st.attn_post_scale is not None:
        head_de = head_de / st.attn_post_scale[:, :, :preds, None]
    head_de = head_de.permute(0, 3, 1, 2) / s  # [layer, head, batch, preds]
    mlp_de = torch.einsum("lbpm,bpm->lbp", st.mlp_write[:, :, :preds], u) / s

    n = batch * preds
    token_index = (row0 + np.arange(batch)[:, None]) * preds + np.arange(preds)[None, :]
    token_index = token_index.reshape(-1).astype(np.int32)
    flat = lambda t: t.reshape(-1).cpu().numpy()  # noqa: E731 - [batch, preds] -> token-major
    ids = rows[:, :preds].reshape(-1).cpu().numpy()
    next_ids = y.reshape(-1).cpu().numpy()
    tokens = pa.table({
        "token_index": token_index,
        "row": np.repeat(np.arange(row0, row0 + batch, dtype=np.int32), preds),
        "pos": np.tile(np.arange(preds, dtype=np.int16), batch),
        "token_id": ids.astype(np.int32),
        "next_token_id": next_ids.astype(np.int32),
        "token_str": strings(ids),
        "next_token_str": strings(next_ids),
        "logit": flat(logit),
        "ln_scale": flat(s),
        "unembed_bias": flat(b_u),
        "loss": flat(loss),
        "de_other": flat(de_other),
    } | ({"entropy": flat(-(logp.exp() * logp).sum(-1))} if metrics else {}))
    heads = pa.table({
        "layer": np.repeat(np.arange(n_layers, dtype=np.int16), n_heads * n),
        "head": np.tile(np.repeat(np.arange(n_heads, dtype=np.int16), n), n_layers),
        "token_index": np.tile(token_index, n_layers * n_heads),
        "de": head_de.reshape(-1).cpu().numpy(),
    })
    mlps = pa.table({
        "layer": np.repeat(np.arange(n_layers, dtype=np.int16), n),
        "token_index": np.tile(token_index, n_layers),
        "de": mlp_de.reshape(-1).cpu().numpy(),
    })
    arrays = {}
    if with_arrays:
        tm = lambda t: t.reshape(n, *t.shape[2:]).cpu().numpy()  # noqa: E731 - [batch, preds, ...] -> [token, ...]
        arrays = {
            "resid_pre": tm(st.resid_pre[:, :, :preds].permute(1, 2, 0, 3)),  # [token, layer, d_model]
            "resid_final": tm(keep(st.resid_final)),
            "z": tm(z.permute(1, 2, 0, 3, 4)),  # [token, layer, head, d_head]
            "norm_scales": tm(keep(st.norm_scales)),  # [token, norm] in manifest.model.norm_names order
        }
        if w.down_final is not None:  # a mixture of experts has no final-MLP neurons
            arrays["mlp_post_final"] = tm(keep(st.post_final_raw))
    return CleanBatch({"tokens": tokens, "head_effects": heads, "mlp_effects": mlps}, arrays)
