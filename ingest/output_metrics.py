"""Output metrics of an ablation from the model's true output distribution (DESIGN.md, "Beyond single heads").

For each ablated copy and token, against the baseline distribution p (the clean run's, or the
condition-ablated run's) and the ablated one p':

- `d_loss = loss' − loss` (cross-entropy of the correct next token, natural log),
- `kl = KL(p ‖ p')`, `d_entropy = H(p') − H(p)`, `top1_changed = argmax p' ≠ argmax p`.

The logits are the model's own: its final norm, the real unembedding with its bias, Cohere's
logit scale and any final softcap, all float32. The vocabulary is walked in chunks with an
online log-sum-exp (running max), so memory does not grow with d_vocab. The baseline's
log-partition `lse` and mean logit E_p[x] are known before a pass, so its probabilities come
out exact per chunk, and

    kl = (lse' − lse) − (E_p[x'] − E_p[x]),   d_loss = (lse' − lse) − Δ_y,   H = lse − E[x].

Float32 rounding leaves about 1e-6 (nats) in each; the passes over the [copy, token, chunk]
logits are kept to five, so the cost stays near the products' (benchmarks/bench_metrics.py).

Cost: 2·d_model·d_vocab FLOPs per token per copy (the baseline copy included), as
`store/estimate.py` models it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor


VOCAB_CHUNK = 4096  # vocabulary entries per step: the working set is copies × tokens × VOCAB_CHUNK floats


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
        scale = float(w.logit_scale)  # folded into W and b: no extra pass over the logits
        return cls(w.final, (W * scale).contiguous() if scale != 1 else W.contiguous(), b * scale, 1.0, w.softcap,
                   chunk)

    @property
    def d_vocab(self) -> int:
        return self.W.shape[0]

    def normed(self, resid: Tensor) -> Tensor:
        return self.norm.apply(resid)

    def raw(self, normed: Tensor, c0: int, c1: int) -> Tensor:
        """Pre-softcap logits of vocabulary entries [c0, c1): [..., c1 − c0]."""
        out = torch.nn.functional.linear(normed, self.W[c0:c1], self.b[c0:c1])
        return out if self.scale == 1 else out * self.scale

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
    mean_x: Float[Tensor, "batch pos"]  # E_p[x], the mean logit under the baseline's own distribution

    @classmethod
    def of(cls, head: OutputHead, resid_final: Tensor, y: Tensor) -> Baseline:
        """The baseline of a run whose final residual (entering the final norm) is `resid_final`."""
        normed = head.normed(resid_final)
        m = s = t = best = top1 = None
        for c0 in range(0, head.d_vocab, head.chunk):
            x = head.cap(head.raw(normed, c0, min(c0 + head.chunk, head.d_vocab)))
            cm, ci = x.max(-1)
            m, s, t = _online(m, s, t, x, cm)
            best, top1 = _argmax(best, top1, cm, ci, c0)
        lse = m + s.log()
        raw_y = head.target(normed, y)
        return cls(head, y, normed, raw_y, lse, _entropy(m, s, t), lse - head.cap(raw_y), top1, t / s)

    def ablated(self, resid: Float[Tensor, "k batch pos d_model"]) -> dict[str, Tensor]:
        """d_loss, kl, d_entropy ([k, batch, pos] float32) and top1_changed (bool) of each ablated copy.

        Per chunk: one product for the baseline copy and one per copy, then five passes over each
        copy's [batch, pos, chunk] logits (max, shift, exp, sum, and a fused multiply-sum). Each copy
        runs alone, so its numbers do not depend on how many units share its pass (a store extended
        unit by unit equals one run, bit for bit).
        """
        head = self.head
        normed = head.normed(resid)  # [k, batch, pos, d_model]
        k = normed.shape[0]
        m, s, t, best, top1, e_x = ([None] * k for _ in range(6))
        for c0 in range(0, head.d_vocab, head.chunk):
            c1 = min(c0 + head.chunk, head.d_vocab)
            p = torch.exp(head.cap(head.raw(self.normed, c0, c1)) - self.lse[..., None])  # the baseline's, exact
            for j in range(k):
                x_abl = head.cap(head.raw(normed[j], c0, c1))  # [batch, pos, chunk]
                e_x[j] = _add(e_x[j], torch.einsum("bpc,bpc->bp", p, x_abl))  # E_p[x']
                cm, ci = x_abl.max(-1)
                m[j], s[j], t[j] = _online(m[j], s[j], t[j], x_abl, cm)
                best[j], top1[j] = _argmax(best[j], top1[j], cm, ci, c0)
        m, s, t, top1, e_x = (torch.stack(v) for v in (m, s, t, top1, e_x))
        d_lse = m + s.log() - self.lse  # log-partition change
        r_y = ((normed - self.normed) * head.W[self.y]).sum(-1) * head.scale  # the target's pre-softcap change
        d_y = head.cap_delta(self.raw_y, r_y)
        # KL(p ‖ p') = E_p[x − x'] + lse' − lse
        return {"d_loss": d_lse - d_y, "kl": d_lse - (e_x - self.mean_x),
                "d_entropy": _entropy(m, s, t) - self.entropy, "top1_changed": top1 != self.top1}


def _add(acc: Tensor | None, x: Tensor) -> Tensor:
    return x if acc is None else acc + x


def _online(m: Tensor | None, s: Tensor | None, t: Tensor | None, x: Tensor, cm: Tensor
            ) -> tuple[Tensor, Tensor, Tensor]:
    """One chunk `x` [..., chunk] (its max `cm`) into the running max m, s = Σ e^(x−m) and t = Σ e^(x−m)·x."""
    new = cm if m is None else torch.maximum(m, cm)
    e = torch.exp(x - new[..., None])
    cs, ct = e.sum(-1), torch.einsum("...c,...c->...", e, x)  # einsum: one fused pass
    if m is None:
        return new, cs, ct
    r = torch.exp(m - new)  # <= 1: the old sums rescaled to the new max
    return new, s * r + cs, t * r + ct


def _entropy(m: Tensor, s: Tensor, t: Tensor) -> Tensor:
    """H = lse − E[x] = m + log s − t / s."""
    return m + s.log() - t / s


def _argmax(best: Tensor | None, idx: Tensor | None, v: Tensor, i: Tensor, c0: int) -> tuple[Tensor, Tensor]:
    """Running top-1 value and index from a chunk's max `v` at `i`; ties go to the lower index, as
    `torch.argmax` over the whole vocabulary."""
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
