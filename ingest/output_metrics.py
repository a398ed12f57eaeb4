"""Output metrics of an ablation from the model's true output distribution (DESIGN.md, "Beyond single heads").

For each ablated copy and token, against the baseline distribution p (the clean run's, or the
condition-ablated run's) and the ablated one p':

- `d_loss = loss' − loss` (cross-entropy of the correct next token, natural log),
- `kl = KL(p ‖ p')`, `d_entropy = H(p') − H(p)`, `top1_changed = argmax p' ≠ argmax p`.

The logits are the model's own: its final norm, the real unembedding with its bias, Cohere's
logit scale and any final softcap, all float32. The vocabulary is walked in chunks with an
online log-sum-exp (running max), so memory does not grow with d_vocab. Per token, with m the
running max, the walk keeps s = Σ e^(x−m) and t = Σ e^(x−m)·(x−m), so

    lse = m + log s,   H = lse − E[x] = log s − t / s,   d_loss = (lse' − lse) − Δ_y,
    kl = (lse' − lse) − E_p[x' − x].

Without a softcap the logits are linear in the normed residual, so E_p[x' − x] = E_p[W]·(normed' −
normed): the baseline's walk sums E_p[W] (one more product per chunk, once per batch) and a copy
needs one dot product per token, not the baseline's logits. With a softcap each pass recomputes
the baseline's probabilities chunk by chunk (one more product per pass). top1_changed needs no
argmax over each copy's vocabulary: the baseline's top-1 stays top-1 exactly when it is the first
max of its own chunk and that chunk is the first to reach the global max.

Float32 rounding leaves about 1e-6 (nats) in each. Per chunk and copy the work is one product and
five passes over the [batch·pos, chunk] logits in two reused buffers, so the cost stays near the
products' (benchmarks/bench_metrics.py).

Cost: 2·d_model·d_vocab FLOPs per token per copy, as `store/flops.py` models it (with a softcap,
one copy more per pass).
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

    def __post_init__(self):
        self.biased = bool(self.b.any())

    @property
    def d_vocab(self) -> int:
        return self.W.shape[0]

    def normed(self, resid: Tensor) -> Tensor:
        return self.norm.apply(resid)

    def chunks(self) -> list[tuple[int, int]]:
        """The vocabulary's chunks [c0, c1), in order."""
        return [(c0, min(c0 + self.chunk, self.d_vocab)) for c0 in range(0, self.d_vocab, self.chunk)]

    def logits(self, normed: Float[Tensor, "rows d_model"], c0: int, c1: int, buf: Tensor) -> Tensor:
        """Logits of vocabulary entries [c0, c1), softcap included, written into `buf`: [rows, c1 − c0].

        One product with the bias added in it; scale and softcap in place, so nothing is allocated.
        """
        out = buf[:normed.shape[0] * (c1 - c0)].view(normed.shape[0], c1 - c0)
        if self.biased:
            torch.addmm(self.b[c0:c1], normed, self.W[c0:c1].T, out=out)
        else:  # most unembeddings have no bias: no pass to copy zeros in
            torch.mm(normed, self.W[c0:c1].T, out=out)
        if self.scale != 1:
            out.mul_(self.scale)
        if self.softcap is not None:  # softcap · tanh(raw / softcap), as `cap`
            out.div_(self.softcap).tanh_().mul_(self.softcap)
        return out

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
    # E_p[W] = Σ_v p_v W_v, so that E_p[x'] − E_p[x] = scale · E_p[W]·(normed' − normed) when the logits are
    # linear in the normed residual (no softcap); None with a softcap.
    mean_w: Float[Tensor, "batch pos d_model"] | None

    @classmethod
    def of(cls, head: OutputHead, resid_final: Tensor, y: Tensor) -> Baseline:
        """The baseline of a run whose final residual (entering the final norm) is `resid_final`."""
        normed = head.normed(resid_final)
        n2 = normed.reshape(-1, normed.shape[-1])  # [batch·pos, d_model]
        bufs = _Buffers(n2.shape[0], head)
        acc = best = top1 = None
        for ci, (c0, c1) in enumerate(head.chunks()):
            x = head.logits(n2, c0, c1, bufs.x)
            cm, at = x.max(-1)  # the exact argmax, ties to the lower index (as torch.argmax)
            best, top1 = _argmax(best, top1, cm, at, c0)
            # E_p[W] beside the sums when the logits are linear in the normed residual
            acc = _fold(acc, x, ci, bufs.e, cm, head.W[c0:c1] if head.softcap is None else None)
        shape = normed.shape[:-1]
        lse = (acc.m + acc.s.log()).view(shape)
        raw_y = head.target(normed, y)
        mean_w = None if acc.w is None else (acc.w / acc.s[:, None]).view(normed.shape)
        return cls(head, y, normed, raw_y, lse, acc.entropy().view(shape), lse - head.cap(raw_y), top1.view(shape),
                   mean_w)

    def ablated(self, resid: Float[Tensor, "k batch pos d_model"]) -> dict[str, Tensor]:
        """d_loss, kl, d_entropy ([k, batch, pos] float32) and top1_changed (bool) of each ablated copy.

        Per chunk and copy: one product, the top-1 check on the rows whose baseline top-1 lies in the
        chunk, and `_fold`'s five passes. Each copy runs alone, on tensors of its own shape, so its
        numbers do not depend on how many units share its pass or where it stands among them (a store
        extended unit by unit equals one run, bit for bit).
        """
        head = self.head
        k = resid.shape[0]
        shape = self.normed.shape[:-1]
        normed = [head.normed(resid[j]) for j in range(k)]  # each copy alone: [batch, pos, d_model]
        n2 = [n.reshape(-1, n.shape[-1]) for n in normed]  # [batch·pos, d_model]
        bufs = _Buffers(n2[0].shape[0], head, probs=head.softcap is not None)
        top1 = self.top1.reshape(-1)
        top1_chunk = torch.div(top1, head.chunk, rounding_mode="floor")
        acc = [None] * k
        hit = [torch.zeros_like(top1, dtype=torch.bool) for _ in range(k)]  # top1 is its chunk's first max
        d_mean = [None] * k  # E_p[x' − x], summed chunk by chunk with a softcap
        for ci, (c0, c1) in enumerate(head.chunks()):
            rows = (top1_chunk == ci).nonzero()[:, 0]  # tokens whose baseline top-1 lies in this chunk
            at = top1[rows] - c0
            if head.softcap is not None:  # the baseline's logits and probabilities of the chunk: lse is known
                x0 = head.logits(self.normed.reshape(n2[0].shape), c0, c1, bufs.x0)
                p = torch.sub(x0, self.lse.reshape(-1, 1), out=bufs.p[:x0.numel()].view_as(x0)).exp_()
            for j in range(k):
                x = head.logits(n2[j], c0, c1, bufs.x)
                if len(rows):
                    hit[j][rows] = x.index_select(0, rows).argmax(-1) == at
                if head.softcap is not None:
                    dx = torch.sub(x, x0, out=bufs.e[1, :x.numel()].view_as(x))
                    d_mean[j] = _add(d_mean[j], dx.mul_(p).sum(-1))
                acc[j] = _fold(acc[j], x, ci, bufs.e)
        out = {m: [] for m in ("d_loss", "kl", "d_entropy", "top1_changed")}
        for j in range(k):
            a = acc[j]
            d_lse = (a.m + a.s.log()).view(shape) - self.lse  # log-partition change
            d_n = normed[j] - self.normed
            if self.mean_w is not None:  # E_p[x' − x] = E_p[W]·(normed' − normed), the bias cancelling
                d_mean[j] = (d_n * self.mean_w).sum(-1) * head.scale
            r_y = (d_n * head.W[self.y]).sum(-1) * head.scale  # the target's pre-softcap change
            out["d_loss"].append(d_lse - head.cap_delta(self.raw_y, r_y))
            out["kl"].append(d_lse - d_mean[j].view(shape))  # KL(p ‖ p') = E_p[x − x'] + lse' − lse
            out["d_entropy"].append(a.entropy().view(shape) - self.entropy)
            # argmax p' = top1 exactly when top1 is the first max of its chunk and that chunk is the first
            # to reach the global max
            out["top1_changed"].append(~(hit[j] & (a.first == top1_chunk)).view(shape))
        return {m: torch.stack(v) for m, v in out.items()}


class _Buffers:
    """One chunk's working memory, reused by every chunk and copy: logits `x`, exponentials `e` (two
    halves) and, with a softcap, the baseline's logits `x0` and probabilities `p` ([batch·pos · chunk]
    floats each)."""

    def __init__(self, rows: int, head: OutputHead, probs: bool = False):
        n = rows * min(head.chunk, head.d_vocab)
        self.x, self.e = head.W.new_empty(n), head.W.new_empty(2, n)
        self.x0, self.p = (head.W.new_empty(n), head.W.new_empty(n)) if probs else (None, None)


@dataclass
class _Sums:
    """The running sums of one copy's walk over the vocabulary, per token ([batch·pos])."""

    m: Tensor  # the running max logit
    s: Tensor  # Σ e^(x − m)
    t: Tensor  # Σ e^(x − m)·(x − m): relative to m, so the entropy does not cancel
    first: Tensor  # the first chunk whose max is m (int64)
    w: Tensor | None = None  # Σ e^(x − m)·W_v [rows, d_model], when asked for

    def entropy(self) -> Tensor:
        """H = lse − E[x] = log s − t / s."""
        return self.s.log() - self.t / self.s


def _fold(acc: _Sums | None, x: Tensor, ci: int, e_buf: Tensor, cm: Tensor | None = None,
          W: Tensor | None = None) -> _Sums:
    """One chunk's logits `x` [rows, chunk] (chunk number `ci`, its row maxima `cm` if known) into the sums.

    Online log-sum-exp in five passes over the chunk: the max, x − m in place, e = e^(x − m) and
    e·(x − m) side by side in `e_buf` [2, ≥ rows·chunk], and one sum of both. With the chunk's
    unembedding rows `W`, also Σ e·W (one product).
    """
    cm = x.amax(-1) if cm is None else cm
    if acc is None:
        new, first = cm, torch.zeros_like(cm, dtype=torch.long)
    else:
        new = torch.maximum(acc.m, cm)
        first = torch.where(cm > acc.m, ci, acc.first)
    z = x.sub_(new[:, None])
    both = e_buf[:, :z.numel()].view(2, *z.shape)  # [e, e·z]
    e = torch.exp(z, out=both[0])
    torch.mul(e, z, out=both[1])
    cs, ct = both.sum(-1)
    if acc is None:
        return _Sums(new, cs, ct, first, None if W is None else e @ W)
    d = acc.m - new  # <= 0: the old sums rescaled to the new max
    r = torch.exp(d)
    w = None if W is None else torch.addmm(acc.w * r[:, None], e, W)
    return _Sums(new, acc.s * r + cs, r * (acc.t + d * acc.s) + ct, first, w)


def _add(acc: Tensor | None, x: Tensor) -> Tensor:
    return x if acc is None else acc + x


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
