"""Output metrics of an ablation from the model's true output distribution (DESIGN.md, "Beyond single heads").

For each ablated copy and token, against the baseline distribution p (the clean run's, or the
condition-ablated run's) and the ablated one p':

- `d_loss = loss' − loss` (cross-entropy of the correct next token, natural log),
- `kl = KL(p ‖ p')`, `d_entropy = H(p') − H(p)`, `top1_changed = argmax p' ≠ argmax p`.

The logits are the model's own: its final norm, the real unembedding with its bias, Cohere's
logit scale and any final softcap, all float32. The vocabulary is walked in chunks with an
online log-sum-exp (running max), so memory does not grow with d_vocab. The baseline's
log-partition `lse` is known before a pass, so its probabilities come out exact per chunk;
with Δ = x' − x each metric is written in terms of Δ, which keeps the float32 rounding a
fraction of the change rather than of the logits themselves:

    lse' − lse = log E_p[e^Δ],   kl = (lse' − lse) − E_p[Δ],   d_loss = (lse' − lse) − Δ_y.

Cost: 2·d_model·d_vocab FLOPs per token per copy (the baseline copy included), as
`store/estimate.py` models it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor


VOCAB_CHUNK = 4096  # vocabulary entries per step: the working set is copies × tokens × VOCAB_CHUNK floats
# Where every |Δ| is below this, lse' − lse comes from E_p[expm1(Δ)] (exact for small changes, no overflow);
# beyond it from the two log-sum-exps.
_DIRECT_MAX = 30.0


@dataclass
class OutputHead:
    """The model's output head, float32: `softcap(scale · (final_norm(x) @ W.T + b))`.

    Args:
        norm: the final norm (`ingest/weights.Norm`).
        W: the unembedding, vocabulary-major [d_vocab, d_model].
        b: its bias [d_vocab] (zeros without one).
        scale: Cohere's logit scale (1 elsewhere).
        softcap: the final logit softcap, or None.
        chunk: vocabulary entries per step.
    """

    norm: object
    W: Float[Tensor, "d_vocab d_model"]
    b: Float[Tensor, "d_vocab"]
    scale: float = 1.0
    softcap: float | None = None
    chunk: int = VOCAB_CHUNK

    @classmethod
    def of(cls, w, chunk: int = VOCAB_CHUNK) -> OutputHead:
        """The head of a model read by `ingest/weights.read_weights`."""
        from transformers.pytorch_utils import Conv1D

        lm = w.model.get_output_embeddings()
        weight = lm.weight.detach().float()
        W = weight.T if isinstance(lm, Conv1D) else weight  # Conv1D stores [in, out]
        b = getattr(lm, "bias", None)
        b = b.detach().float() if isinstance(b, Tensor) else W.new_zeros(W.shape[0])
        return cls(w.final, W.contiguous(), b, float(w.logit_scale), w.softcap, chunk)

    @property
    def d_vocab(self) -> int:
        return self.W.shape[0]

    def normed(self, resid: Tensor) -> Tensor:
        return self.norm.apply(resid)

    def raw(self, normed: Tensor, c0: int, c1: int) -> Tensor:
        """Pre-softcap logits of vocabulary entries [c0, c1): [..., c1 − c0]."""
        return torch.nn.functional.linear(normed, self.W[c0:c1], self.b[c0:c1]) * self.scale

    def delta_raw(self, d_normed: Tensor, c0: int, c1: int) -> Tensor:
        """The change of the pre-softcap logits for a change `d_normed` of the normed residual (no bias)."""
        return torch.nn.functional.linear(d_normed, self.W[c0:c1]) * self.scale

    def cap(self, raw: Tensor) -> Tensor:
        return raw if self.softcap is None else self.softcap * torch.tanh(raw / self.softcap)

    def cap_delta(self, raw: Tensor, d_raw: Tensor) -> Tensor:
        """cap(raw + d_raw) − cap(raw), without cancelling: tanh a − tanh b = tanh(a − b)(1 − tanh a tanh b)."""
        if self.softcap is None:
            return d_raw
        c = self.softcap
        return c * torch.tanh(d_raw / c) * (1 - torch.tanh(raw / c) * torch.tanh((raw + d_raw) / c))

    def target(self, normed: Tensor, y: Tensor) -> Tensor:
        """Pre-softcap logit of each position's correct token: [...]."""
        return ((normed * self.W[y]).sum(-1) + self.b[y]) * self.scale


@dataclass
class Baseline:
    """The baseline run's output distribution per token, from one chunked walk of the vocabulary.

    `lse`, `entropy`, `loss` and `top1` are [batch, pos]; `normed` the final-normed residual.
    """

    head: OutputHead
    y: Int[Tensor, "batch pos"]
    normed: Float[Tensor, "batch pos d_model"]
    raw_y: Float[Tensor, "batch pos"]
    lse: Float[Tensor, "batch pos"]
    entropy: Float[Tensor, "batch pos"]
    loss: Float[Tensor, "batch pos"]
    top1: Int[Tensor, "batch pos"]

    @classmethod
    def of(cls, head: OutputHead, resid_final: Tensor, y: Tensor) -> Baseline:
        """The baseline of a run whose final residual (entering the final norm) is `resid_final`."""
        normed = head.normed(resid_final)
        m = s = t = best = top1 = None
        for c0 in range(0, head.d_vocab, head.chunk):
            x = head.cap(head.raw(normed, c0, min(c0 + head.chunk, head.d_vocab)))
            m, s, t = _online(m, s, t, x)
            best, top1 = _argmax(best, top1, x, c0)
        lse = m + s.log()
        raw_y = head.target(normed, y)
        return cls(head, y, normed, raw_y, lse, s.log() - t / s, lse - head.cap(raw_y), top1)

    def ablated(self, resid: Float[Tensor, "k batch pos d_model"]) -> dict[str, Tensor]:
        """d_loss, kl, d_entropy ([k, batch, pos] float32) and top1_changed (bool) of each ablated copy."""
        head = self.head
        d_normed = head.normed(resid) - self.normed  # [k, batch, pos, d_model]
        m = s = t = best = top1 = None
        e_delta = e_expm1 = big = None
        for c0 in range(0, head.d_vocab, head.chunk):
            c1 = min(c0 + head.chunk, head.d_vocab)
            raw = head.raw(self.normed, c0, c1)  # [batch, pos, chunk], the baseline copy
            x = head.cap(raw)
            delta = head.cap_delta(raw, head.delta_raw(d_normed, c0, c1))  # [k, batch, pos, chunk]
            p = torch.exp(x - self.lse[..., None])
            e_delta = _add(e_delta, (p * delta).sum(-1))
            e_expm1 = _add(e_expm1, (p * torch.expm1(delta.clamp(max=_DIRECT_MAX))).sum(-1))
            big = _max(big, delta.abs().amax(-1))
            x_abl = x + delta
            m, s, t = _online(m, s, t, x_abl)
            best, top1 = _argmax(best, top1, x_abl, c0)
        lse_abl = m + s.log()
        d_lse = torch.where(big < _DIRECT_MAX, torch.log1p(e_expm1), lse_abl - self.lse)
        r_y = (d_normed * head.W[self.y]).sum(-1) * head.scale  # the change of the target's pre-softcap logit
        d_y = head.cap_delta(self.raw_y, r_y)
        return {"d_loss": d_lse - d_y, "kl": d_lse - e_delta,
                "d_entropy": (s.log() - t / s) - self.entropy, "top1_changed": top1 != self.top1}


def _add(acc: Tensor | None, x: Tensor) -> Tensor:
    return x if acc is None else acc + x


def _max(acc: Tensor | None, x: Tensor) -> Tensor:
    return x if acc is None else torch.maximum(acc, x)


def _online(m: Tensor | None, s: Tensor | None, t: Tensor | None, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One chunk `x` [..., chunk] into the running max m, Σ e^(x−m) and Σ e^(x−m)(x−m) (entropy = log s − t/s)."""
    cm = x.amax(-1)
    if m is None:
        e = torch.exp(x - cm[..., None])
        return cm, e.sum(-1), (e * (x - cm[..., None])).sum(-1)
    new = torch.maximum(m, cm)
    shift = m - new  # <= 0: rescale the old sums to the new max
    r = torch.exp(shift)
    e = torch.exp(x - new[..., None])
    return new, s * r + e.sum(-1), r * (t + s * shift) + (e * (x - new[..., None])).sum(-1)


def _argmax(best: Tensor | None, idx: Tensor | None, x: Tensor, c0: int) -> tuple[Tensor, Tensor]:
    """Running top-1 value and index; ties go to the lower index, as `torch.argmax` over the whole vocabulary."""
    v, i = x.max(-1)
    i = i + c0
    if best is None:
        return v, i
    take = v > best
    return torch.where(take, v, best), torch.where(take, i, idx)


def full_metrics(clean_logits: Tensor, abl_logits: Tensor, y: Tensor) -> dict[str, Tensor]:
    """The same metrics from whole logits (the reference engine and the self-check): full-vocabulary softmaxes.

    Args:
        clean_logits: the baseline's final logits [..., d_vocab].
        abl_logits: the ablated run's [..., d_vocab] (same leading shape).
        y: correct next tokens [...].
    """
    lp, lq = torch.log_softmax(clean_logits.float(), -1), torch.log_softmax(abl_logits.float(), -1)
    p, q = lp.exp(), lq.exp()
    loss = lambda l: -l.gather(-1, y[..., None])[..., 0]  # noqa: E731
    return {"d_loss": loss(lq) - loss(lp), "kl": (p * (lp - lq)).sum(-1),
            "d_entropy": -(q * lq).sum(-1) + (p * lp).sum(-1),
            "top1_changed": clean_logits.argmax(-1) != abl_logits.argmax(-1)}


def entropy(logits: Tensor) -> Tensor:
    """H of the softmax of whole logits, float32, natural log: [...]."""
    lp = torch.log_softmax(logits.float(), -1)
    return -(lp.exp() * lp).sum(-1)
