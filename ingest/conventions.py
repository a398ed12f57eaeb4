"""Weight conventions: what `u` (and so every DE and logit) means for a run (`ingest/weights.py` reads them).

Plain names and texts, so the manifest and the plan can name a convention without loading torch.
"""

from __future__ import annotations

PROCESSED = "processed"  # DESIGN.md: final-norm gain folded into W_U, W_U centred
UNFOLDED = "unfolded"  # the paper preset on Llama: raw W_U, no gain, no centring (the authors' LLaMA-7B)
CONVENTIONS = {
    PROCESSED: "DE_c = c · u / s with u = centre(g ⊙ W_U[:, y]) (TransformerLens fold_ln, center_writing_weights, "
               "center_unembed); logit = the model's vocab-centred logit; Σ DE = logit − b_U[y]",
    UNFOLDED: "DE_c = c · W_U[:, y] / s, the raw unembedding column without the final norm's gain and uncentred, "
              "as the authors' collect_direct_effect on LLaMA-7B (fold_ln=False, center_writing_weights=False, "
              "center_unembed=False); logit = the model's uncentred logit with the final norm's gain set to 1, "
              "so Σ DE = logit − b_U[y] still holds; the model's real logit is not stored",
}


def convention_for(family_name: str, preset: str | None) -> str:
    """The weight convention of a run: UNFOLDED for a Llama model under the paper preset, else PROCESSED."""
    return UNFOLDED if preset == "paper" and family_name == "Llama" else PROCESSED
