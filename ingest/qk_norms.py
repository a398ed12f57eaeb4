"""Frozen norms inside attention: the query and key norms (DESIGN.md, "Measured mechanisms").

*frozen-norms* makes every norm downstream of the unit divide by its baseline-run scale. Besides
the residual-stream norms (`ingest/counterfactual.frozen_norm_hooks`), some families normalise
queries and keys inside attention: Qwen3 and Qwen3-MoE (per head, RMS), OLMoE (over all heads,
RMS), Cohere with `use_qk_norm` (per head, LayerNorm), Phi and StableLM with `qk_layernorm`
(per head, LayerNorm). Each such norm is a leaf module inside the attention module that
normalises its input over the last dim; its scale is recorded in one forward of the baseline
run, and a frozen pass rescales the module's own output to the recorded scale:

    y_frozen = (y − b) · s(x) / s_baseline + b,    y = g ⊙ (x − μ) / s(x) + b,

which is g ⊙ (x − μ) / s_baseline + b for any gain form (Gemma's 1 + w included) without
reading the gain. s is the module's own formula: sqrt(mean((x − μ)²) + eps) for a LayerNorm,
sqrt(mean(x²) + eps) for an RMSNorm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from selfrepair.errors import UnsupportedModel
from selfrepair.ingest.families import attention_modules
from selfrepair.ingest import engine as E
from selfrepair.ingest.layer_calls import hooks


def _is_norm(m: torch.nn.Module) -> bool:
    return "norm" in type(m).__name__.lower() and not any(True for _ in m.children())


def _eps(m: torch.nn.Module) -> float:
    for name in ("eps", "variance_epsilon", "epsilon"):
        if isinstance(getattr(m, name, None), (int, float)):
            return float(getattr(m, name))
    raise UnsupportedModel(f"{type(m).__name__}: a query/key norm without a readable epsilon, so frozen-norms "
                           "cannot freeze its scale")


def _centred(m: torch.nn.Module) -> bool:
    """LayerNorms subtract the mean; RMSNorms do not (told apart by class name, as transformers names them)."""
    return "rms" not in type(m).__name__.lower()


def norm_scale(m: torch.nn.Module, x: Tensor) -> Tensor:
    """The norm module's scale on input x over the last dim, float32, [..., 1]."""
    x = x.float()
    if _centred(m):
        x = x - x.mean(-1, keepdim=True)
    return (x.pow(2).mean(-1, keepdim=True) + _eps(m)).sqrt()


def qk_norm_modules(w) -> list[list[torch.nn.Module]]:
    """Per layer, the norm modules inside its attention (queries' and keys' norms; empty for most families)."""
    return [[m for m in attn.modules() if m is not attn and _is_norm(m)] for attn in attention_modules(w)]


@dataclass
class QKScales:
    """Each q/k norm's scale in the baseline run, per layer, with the dim that holds positions."""

    modules: list[list[torch.nn.Module]]
    scales: list[list[Tensor]]  # [layer][norm] of [batch, …, 1] (the module input's shape, last dim 1)
    pos_dims: list[list[int]]

    def cut(self, layer: int, j: int, rows: Tensor, n_pos: int) -> Tensor:
        """Norm j of `layer`'s scales at `rows` (batch indices, repeats allowed) and positions 0..n_pos-1."""
        s = self.scales[layer][j][rows]
        return s.narrow(self.pos_dims[layer][j], 0, n_pos)


def frozen_output(m: torch.nn.Module, x: Tensor, out: Tensor, s_base: Tensor) -> Tensor:
    """The norm module m's output `out` on input x, rescaled to divide by `s_base` instead of its own s(x)."""
    b = getattr(m, "bias", None)
    b = b.float() if isinstance(b, Tensor) else 0.0
    return ((out.float() - b) * (norm_scale(m, x) / s_base) + b).to(out.dtype)


def _pos_dim(m: torch.nn.Module, shape: torch.Size, pos: int) -> int:
    dims = [d for d in range(1, len(shape) - 1) if shape[d] == pos]
    if len(dims) != 1:
        raise UnsupportedModel(f"{type(m).__name__}: cannot tell the positions among its input dims {tuple(shape)}, "
                               "so frozen-norms cannot freeze this query/key norm")
    return dims[0]


def record_qk_scales(w, base) -> QKScales | None:
    """The q/k norms' scales in the baseline run `base` (a FastBatch: clean, or condition-ablated), from one
    forward of its rows; None when the model's attention has no norms."""
    mods = qk_norm_modules(w)
    if not any(mods):
        return None
    got: dict[int, Tensor] = {}

    def keep(m):
        def hook(module, args, out):
            got[id(module)] = norm_scale(module, args[0]).detach()
        return hook

    regs = [lambda m=m: m.register_forward_hook(keep(m)) for ms in mods for m in ms]
    with torch.no_grad(), hooks(*regs):
        E.clean_run(w, base.rows, replace=base.base, logits=False)
    pos = base.rows.shape[1]
    scales, dims = [], []
    for ms in mods:
        missing = [m for m in ms if id(m) not in got]
        if missing:
            raise UnsupportedModel(f"{type(missing[0]).__name__}: a norm inside attention did not run, so "
                                   "frozen-norms cannot record its scale")
        scales.append([got[id(m)] for m in ms])
        dims.append([_pos_dim(m, got[id(m)].shape, pos) for m in ms])
    return QKScales(mods, scales, dims)


def frozen_qk_hooks(qk: QKScales | None, layer: int, rows: Tensor, n_pos: int) -> list:
    """Registrations making the q/k norms of layers `layer`… use their baseline scales at the pass's `rows`
    and positions; the pass's copies are tiled batch-major, so a scale is repeated per copy."""
    if qk is None:
        return []
    regs = []
    for i in range(layer, len(qk.modules)):
        for j, m in enumerate(qk.modules[i]):
            s = qk.cut(i, j, rows, n_pos)

            def hook(module, args, out, s=s):
                copies = args[0].shape[0] // s.shape[0]
                return frozen_output(module, args[0], out, s.repeat(copies, *([1] * (s.dim() - 1))))
            regs.append(lambda m=m, hook=hook: m.register_forward_hook(hook))
    return regs
