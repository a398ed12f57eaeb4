"""The clean pass: one hooked TransformerBridge forward per batch, captured and decomposed.

Every DE is `(component · u) / s`, with `u = W_U[:, y]` (centred) and `s` the final
norm's `ln_final.hook_scale`. `de_other` is computed from the embeddings and the
attention biases directly, never as a remainder, so the identity
Σ DE = logit − b_U[y] is a real check of the store.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from selfrepair.ingest.engine import target_columns
from selfrepair.ingest.models import LoadedModel
from selfrepair.ingest.weights import ModelWeights


def hook_names(n_layers: int) -> list[str]:
    """Exactly the hooks the clean tables and arrays read (TransformerLens names)."""
    last = n_layers - 1
    names = ["hook_embed", "hook_pos_embed", "ln_final.hook_scale",
             f"blocks.{last}.hook_resid_post", f"blocks.{last}.mlp.hook_post"]
    for layer in range(n_layers):
        names += [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.attn.hook_z",
                  f"blocks.{layer}.hook_mlp_out", f"blocks.{layer}.ln1.hook_scale",
                  f"blocks.{layer}.ln2.hook_scale"]
    return names


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


@dataclass
class CleanBatch:
    """The clean pass over one batch of rows: Parquet tables and token-major arrays."""

    tables: dict[str, pa.Table]
    arrays: dict[str, np.ndarray]


def run_clean(model: LoadedModel, w: ModelWeights, rows: torch.Tensor, row0: int,
              strings: TokenStrings, with_arrays: bool) -> CleanBatch:
    """Run and decompose the clean forward for `rows` [batch, seq_len] starting at row `row0`.

    Returns:
        Tables `tokens`, `head_effects`, `mlp_effects` and, when asked, the Zarr arrays,
        for the batch's (seq_len - 1) predictions per row.
    """
    n_layers, n_heads = w.n_layers, w.n_heads
    names = set(hook_names(n_layers))
    with torch.no_grad():
        logits, cache = model.bridge.run_with_cache(
            rows, names_filter=lambda n: n in names, return_type="logits"
        )
    batch, seq = rows.shape
    preds = seq - 1
    y = rows[:, 1:]  # [batch, preds] correct next tokens
    keep = lambda t: t[:, :preds]  # noqa: E731 - drop the last position: it predicts nothing
    u = target_columns(w, y)  # [batch, preds, d_model]
    s = keep(cache["ln_final.hook_scale"])[..., 0].float()  # [batch, preds]
    logp = torch.log_softmax(keep(logits).float(), dim=-1)
    loss = -logp.gather(-1, y[..., None])[..., 0]
    logit = keep(logits).float().gather(-1, y[..., None])[..., 0]
    b_u = w.b_U[y]

    # Embeddings and every attention bias b_O are neither a head nor an MLP.
    other = keep(cache["hook_embed"]).float() + w.b_O.sum(0)
    if "hook_pos_embed" in cache:
        other = other + keep(cache["hook_pos_embed"]).float()
    de_other = (other * u).sum(-1) / s
    z = torch.stack([keep(cache[f"blocks.{l}.attn.hook_z"]).float() for l in range(n_layers)])
    # head DE: z_h · (W_O[l, h] @ u) / s, one dot product per token.
    head_de = torch.einsum("lbphd,lhdm,bpm->lhbp", z, w.W_O, u) / s
    mlp_out = torch.stack([keep(cache[f"blocks.{l}.hook_mlp_out"]).float() for l in range(n_layers)])
    mlp_de = torch.einsum("lbpm,bpm->lbp", mlp_out, u) / s

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
    })
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
        last = n_layers - 1
        tm = lambda t: t.reshape(n, *t.shape[2:]).cpu().numpy()  # noqa: E731 - [batch, preds, ...] -> [token, ...]
        resid_pre = torch.stack([keep(cache[f"blocks.{l}.hook_resid_pre"]) for l in range(n_layers)], 2)
        scales = [keep(cache[f"blocks.{l}.{ln}.hook_scale"])[..., 0] for l in range(n_layers) for ln in ("ln1", "ln2")]
        arrays = {
            "resid_pre": tm(resid_pre),  # [token, layer, d_model]
            "resid_final": tm(keep(cache[f"blocks.{last}.hook_resid_post"])),
            "z": tm(z.permute(1, 2, 0, 3, 4)),  # [token, layer, head, d_head]
            "norm_scales": tm(torch.stack(scales + [s], -1)),  # [token, 2 * layer + 1]
            "mlp_post_final": tm(keep(cache[f"blocks.{last}.mlp.hook_post"])),
        }
    return CleanBatch({"tokens": tokens, "head_effects": heads, "mlp_effects": mlps}, arrays)
