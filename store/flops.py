"""The FLOP model of the ablation sweep and of the output metrics (2 FLOPs per multiply-add).

Counted from the architecture alone, so the ingest's plan and the benchmarks
(`benchmarks/bench_flops.py`, which measures the sweep against it) share one model.
"""

from __future__ import annotations

from dataclasses import dataclass


GATES = ("gate_proj", "gate_up_proj")  # an MLP module with one of these is gated (three matrices, not two)


@dataclass(frozen=True)
class Arch:
    """The shape facts the FLOP count needs."""

    n_layers: int
    n_heads: int
    n_kv: int
    d_head: int
    d_model: int
    d_mlp: int
    gated: bool
    parallel: bool

    @classmethod
    def of(cls, w) -> "Arch":
        """From the engine's `Weights` (the key/value head count and gating from the HF modules)."""
        n_kv = getattr(w.model.config, "num_key_value_heads", None) or w.n_heads
        mlp = w.mlp_out[0]
        gated = any(hasattr(mlp, a) for a in GATES)
        return cls(w.n_layers, w.n_heads, n_kv, w.d_head, w.d_model, w.d_mlp, gated, w.parallel)


def layer_flops(a: Arch, seq_len: int) -> tuple[float, float]:
    """FLOPs per token of one full block (2 per multiply-add), split (attention, MLP).

    Attention: Q and O projections (n_heads·d_head wide), K and V (n_kv·d_head wide, GQA),
    then scores and the weighted sum over the causal prefix: a query at position p reads
    p + 1 keys, (seq_len + 1) / 2 on average. MLP: in and out, plus the gate if gated.
    Norms, activations, rotary and biases are O(d_model) and left out.
    """
    proj = 2 * a.d_model * a.d_head * (2 * a.n_heads + 2 * a.n_kv)
    mix = 2 * 2 * a.n_heads * a.d_head * (seq_len + 1) / 2
    mlp = 2 * a.d_model * a.d_mlp * (3 if a.gated else 2)
    return proj + mix, mlp


def head_ablation_flops(a: Arch, layer: int, seq_len: int) -> float:
    """Lower bound of FLOPs per token to ablate one head of `layer` and read the logit.

    Layers after `layer` run in full; in a sequential block the layer's own MLP reads the
    patched residual and runs too (in a parallel block it read the clean one); the logit
    needs only the correct token's unembedding column (2·d_model), never the full vocab.
    Upstream layers and the other heads of `layer` are cached from the clean run: 0.
    """
    attn, mlp = layer_flops(a, seq_len)
    later = (a.n_layers - 1 - layer) * (attn + mlp)
    return later + (0 if a.parallel else mlp) + 2 * a.d_model


def sweep_flops(a: Arch, heads: list[tuple[int, int]], n_rows: int, seq_len: int) -> float:
    """Lower bound for ablating every (layer, head) on `n_rows` rows (predictions only)."""
    tokens = n_rows * (seq_len - 1)
    return sum(head_ablation_flops(a, layer, seq_len) for layer, _ in heads) * tokens


def output_metric_flops(d_model: int, d_vocab: int, units_per_pass: int, softcapped: bool = False) -> float:
    """FLOPs per unit-token of the output metrics (ingest/output_metrics.py).

    The full-vocabulary unembedding, 2·d_model·d_vocab per token of each unit's copy. The baseline's
    distribution, with E_p[W] (one more product), is computed once per batch (ingest/ablate.py
    `FastBatch.output`) and shared by every pass of the batch, so, like the O(d_vocab) work per token,
    it is left out. Without a softcap a pass needs nothing more of the baseline (the KL's E_p[x' − x]
    is E_p[W]·Δnormed); with one (`softcapped`), each pass recomputes the baseline's logits, one copy
    more per `units_per_pass` units.
    """
    return 2 * d_model * d_vocab * (1 + 1 / units_per_pass if softcapped else 1)


def output_metrics_share(a: Arch, d_vocab: int, seq_len: int, layers: list[int], per_pass: int | None = None,
                         softcapped: bool = False) -> float:
    """The output metrics' FLOPs as a fraction of the sweep's lower bound, for units with these first layers.

    Args:
        a: the architecture.
        d_vocab: the unembedding's vocabulary.
        seq_len: tokens per row.
        layers: each ablated unit's first layer (a unit's pass runs from it, as a head's).
        per_pass: units per patched pass (`--heads-per-pass`), or None: every unit of a first layer.
        softcapped: the model's final logits are softcapped (`output_metric_flops`).
    """
    by_layer: dict[int, int] = {}
    for layer in layers:
        by_layer[layer] = by_layer.get(layer, 0) + 1
    sweep = sum(n * head_ablation_flops(a, layer, seq_len) for layer, n in by_layer.items())
    metrics = sum(n * output_metric_flops(a.d_model, d_vocab, min(n, per_pass or n), softcapped)
                  for n in by_layer.values())
    return metrics / sweep if sweep else 0.0


def human_flops(n: float) -> str:
    """`56.6 MFLOP`, `16.4 kFLOP`: a FLOP count with an SI prefix."""
    for unit, size in (("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} FLOP"
