"""The logit lens of what a unit writes: its mean direct effect toward every vocabulary token.

Over the unit's top p% tokens (clean run), the unit's write to the residual divided by the final
norm's scale at each token, averaged, then projected on the processed unembedding `W_U` (final-norm
gain folded, centred): the value for the correct next token at one position is that position's DE
(DESIGN.md), so the lens reads as "mean DE toward each token". Computed on the CPU from the stored
activations and weights (`Store.activations`), never torch.

What each unit kind can show, from what a store keeps (`weights/`: W_O, W_U, b_U, W_out_final; arrays
`z`, `mlp_post_final`, `norm_scales`):
- heads, groups, ATTN: every head's `z @ W_O` (z kept);
- MLP: the final layer only, from its neurons (`mlp_post_final @ W_out_final`; the output bias is not
  stored); no other MLP's output is kept;
- BLOCK: its heads, and its MLP when it is the final layer's.
A store ingested with `--activations none` (or without `z`) has no lens; nor does a model with
post-norm blocks, whose head writes divide by a per-block scale the lens does not apply.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from selfrepair.errors import SelfRepairError
from selfrepair.store.labels import Unit

LENS_TOKENS = 10  # promoted and suppressed tokens shown


@dataclass(frozen=True)
class Lens:
    """The lens of one unit.

    Args:
        promoted: the tokens with the largest mean DE (token_id, token, value), largest first.
        suppressed: the smallest (most negative) first.
        covers: what the lens sums, in words (e.g. "heads L1H0, L1H3 (z @ W_O)").
        n_tokens: the top tokens averaged over.
    """

    promoted: pl.DataFrame
    suppressed: pl.DataFrame
    covers: str
    n_tokens: int


def coverage(unit: Unit, n_layers: int, n_heads: int, arrays: set[str], post_norm: bool
             ) -> tuple[list[tuple[int, int]], bool, str]:
    """Which of the unit's components the store lets the lens read.

    Returns:
        (heads read, whether the final MLP is read, why something is left out: "" when nothing is).
    """
    if post_norm:
        return [], False, "the model has post-norm blocks (a head's write divides by a per-block scale the lens lacks)"
    heads = list(unit.heads(n_heads)) if "z" in arrays else []
    final = n_layers - 1 in unit.mlps() and "mlp_post_final" in arrays
    missing = []
    if unit.heads(n_heads) and not heads:
        missing.append("its heads (the store keeps no z)")
    other_mlps = [m for m in unit.mlps() if not (final and m == n_layers - 1)]
    if other_mlps:
        kept = "only the final MLP's activations" if "mlp_post_final" in arrays else "no MLP activations"
        missing.append(", ".join(f"MLP{m}" for m in other_mlps) + f" (the store keeps {kept})")
    why = "leaves out " + " and ".join(missing) if missing else ""
    return heads, final, why


def unit_lens(ds, unit: Unit, n_layers: int, n_heads: int, token_index, post_norm: bool = False,
              k: int = LENS_TOKENS) -> tuple[Lens | None, str]:
    """The lens of `unit` over `token_index`, and a note on what it leaves out ("" when nothing).

    Args:
        ds: the model's activations (`Store.activations(model)`), or None when it keeps none.
        unit: the unit.
        n_layers, n_heads: the model's shape.
        token_index: the unit's top tokens.
        post_norm: the model has post-norm blocks.
        k: tokens listed each way.

    Returns:
        (the Lens, or None when nothing of the unit can be read; the note).
    """
    if ds is None:
        return None, "not available: the store keeps no activations (ingested with --activations none)"
    heads, final, why = coverage(unit, n_layers, n_heads, set(ds.data_vars), post_norm)
    if not heads and not final:
        return None, "not available: " + (why.removeprefix("leaves out ") or "nothing of the unit is stored")
    idx = np.sort(np.asarray(token_index, dtype=np.int64))
    if idx.size == 0:
        return None, "not available: the unit has no top tokens"
    write = np.zeros((idx.size, ds.sizes["d_model"]))  # [token, d_model]
    z = ds["z"].isel(token_index=idx).values.astype(np.float64) if heads else None  # [token, layer, head, d_head]
    w_o = ds["W_O"].values.astype(np.float64) if heads else None  # [layer, head, d_head, d_model]
    for layer, head in heads:
        write += z[:, layer, head] @ w_o[layer, head]
    if final:
        post = ds["mlp_post_final"].isel(token_index=idx).values.astype(np.float64)  # [token, d_mlp]
        write += post @ ds["W_out_final"].values.astype(np.float64)
    s = ds["norm_scales"].isel(token_index=idx, norm=-1).values.astype(np.float64)  # final norm, [token]
    mean = (write / s[:, None]).mean(0)  # [d_model]
    # W_U stays float32 (as stored): a float64 copy of a 50k-token unembedding would be 400 MB per page.
    lens = (mean.astype(np.float32) @ ds["W_U"].values).astype(np.float64)  # [d_vocab]
    words = (ds["vocab_str"].values if "vocab_str" in ds.coords else np.array([str(i) for i in range(lens.size)]))
    order = np.argsort(-lens, kind="stable")
    k = min(k, lens.size)

    def frame(ids) -> pl.DataFrame:
        return pl.DataFrame({"token_id": ids.astype(np.int64), "token": [str(words[i]) for i in ids],
                             "value": lens[ids]})

    parts = []
    if heads:
        parts.append(("head " if len(heads) == 1 else "heads ")
                     + ", ".join(f"L{l}H{h}" for l, h in heads) + " (z @ W_O)")
    if final:
        parts.append(f"MLP{n_layers - 1}'s neurons (mlp_post_final @ W_out_final, no output bias)")
    return Lens(frame(order[:k]), frame(order[::-1][:k]), " and ".join(parts), int(idx.size)), why


def open_lens_data(store, model: str):
    """The model's activations for the lens, or None when the store keeps none (or they fail their checks)."""
    if not store.manifest(model).arrays:
        return None
    try:
        return store.activations(model, token_coords=False)
    except SelfRepairError:
        return None
