"""Processed weights pulled out of a TransformerBridge, in TransformerLens's stacked shapes.

The bridge (after `enable_compatibility_mode()`) has folded every norm's gain into the
next weight, centred the writing weights and centred `W_U` over the vocabulary, so a
norm here is a bare normalisation (no gain, no bias) and logits come out centred.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from selfrepair.errors import ConfigError

_ACTS = {
    "gelu": lambda x: torch.nn.functional.gelu(x),
    "gelu_new": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "silu": torch.nn.functional.silu,
    "relu": torch.relu,
}


@dataclass
class ModelWeights:
    """Every weight the forward pass needs, stacked by layer.

    GQA models keep their `n_kv` key/value heads; queries have `n_heads`.
    Bias-free models get zero biases so the arithmetic has one shape.
    """

    W_Q: Float[Tensor, "layer head d_model d_head"]
    b_Q: Float[Tensor, "layer head d_head"]
    W_K: Float[Tensor, "layer kv d_model d_head"]
    b_K: Float[Tensor, "layer kv d_head"]
    W_V: Float[Tensor, "layer kv d_model d_head"]
    b_V: Float[Tensor, "layer kv d_head"]
    W_O: Float[Tensor, "layer head d_head d_model"]
    b_O: Float[Tensor, "layer d_model"]
    W_in: Float[Tensor, "layer d_model d_mlp"]
    b_in: Float[Tensor, "layer d_mlp"]
    W_gate: Float[Tensor, "layer d_model d_mlp"] | None
    W_out: Float[Tensor, "layer d_mlp d_model"]
    b_out: Float[Tensor, "layer d_model"]
    W_U: Float[Tensor, "d_model d_vocab"]
    b_U: Float[Tensor, "d_vocab"]
    W_E: Float[Tensor, "d_vocab d_model"]
    W_pos: Float[Tensor, "n_ctx d_model"] | None  # learned absolute positions (GPT-2) only
    norm: str  # "LN" (centre and scale) or "RMS" (scale only)
    eps: float
    parallel: bool
    act_fn: str
    attn_scale: float  # scores are divided by this
    cos: Float[Tensor, "pos rot"] | None  # rotary tables, HF rotate-half layout
    sin: Float[Tensor, "pos rot"] | None

    @property
    def n_layers(self) -> int:
        return self.W_Q.shape[0]

    @property
    def n_heads(self) -> int:
        return self.W_Q.shape[1]

    @property
    def n_kv(self) -> int:
        return self.W_K.shape[1]

    @property
    def d_model(self) -> int:
        return self.W_Q.shape[2]

    @property
    def d_head(self) -> int:
        return self.W_Q.shape[3]

    @property
    def d_mlp(self) -> int:
        return self.W_in.shape[2]

    def act(self, x: Tensor) -> Tensor:
        return _ACTS[self.act_fn](x)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "ModelWeights":
        moved = {}
        for name, value in self.__dict__.items():
            moved[name] = value.to(device=device, dtype=dtype) if isinstance(value, Tensor) else value
        return ModelWeights(**moved)


def _stack(bridge, name: str, shape: tuple[int, ...]) -> Tensor:
    """A stacked parameter, or zeros where the checkpoint has no such bias."""
    try:
        value = getattr(bridge, name)
    except AttributeError:
        value = None
    if value is None:
        return torch.zeros(shape)
    return value.detach().float().clone()


def _rotary_tables(bridge, seq_len: int) -> tuple[Tensor | None, Tensor | None]:
    """Capture the cos/sin tables the bridge itself uses, so scaled RoPE variants match."""
    if bridge.cfg.positional_embedding_type != "rotary":
        return None, None
    names = lambda n: n.endswith("hook_cos") or n.endswith("hook_sin")  # noqa: E731
    tokens = torch.zeros((1, seq_len), dtype=torch.long)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens, names_filter=names)
    cos_key = next(k for k in cache.keys() if k.endswith("hook_cos"))
    sin_key = cos_key.replace("hook_cos", "hook_sin")
    # [batch, pos, rot] or [pos, rot] depending on the adapter; keep [pos, rot].
    cos, sin = cache[cos_key].float(), cache[sin_key].float()
    while cos.dim() > 2:
        cos, sin = cos[0], sin[0]
    return cos.clone(), sin.clone()


def weights_from_bridge(bridge, seq_len: int) -> ModelWeights:
    """Read the processed weights of a bridge in compatibility mode.

    Args:
        bridge: a `TransformerBridge` after `enable_compatibility_mode()`.
        seq_len: the longest row the engine will see (for the rotary tables).

    Returns:
        float32 CPU weights; move them with `.to(device, dtype)`.
    """
    cfg = bridge.cfg
    n_layers, n_heads, d_model, d_head = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head
    n_kv = getattr(cfg, "n_key_value_heads", None) or n_heads
    act = cfg.act_fn
    if act not in _ACTS:
        raise ConfigError(f"activation function {act!r} is not supported by the fast engine")
    if cfg.normalization_type not in ("LN", "LNPre", "RMS", "RMSPre"):
        raise ConfigError(f"normalization {cfg.normalization_type!r} is not supported")
    W_Q = bridge.W_Q.detach().float().clone()
    d_mlp = bridge.W_in.shape[-1]
    W_gate = None
    if getattr(cfg, "gated_mlp", False):
        W_gate = bridge.W_gate.detach().float().clone()
    W_K = bridge.W_K.detach().float().clone()
    if W_K.shape[1] != n_kv:
        # Some adapters expose keys already expanded to every query head.
        n_kv = W_K.shape[1]
    attn_scale = cfg.attn_scale if cfg.attn_scale and cfg.attn_scale > 0 else d_head**0.5
    if not getattr(cfg, "use_attn_scale", True):
        attn_scale = 1.0
    cos, sin = _rotary_tables(bridge, seq_len)
    return ModelWeights(
        W_Q=W_Q,
        b_Q=_stack(bridge, "b_Q", (n_layers, n_heads, d_head)),
        W_K=W_K,
        b_K=_stack(bridge, "b_K", (n_layers, n_kv, d_head)),
        W_V=bridge.W_V.detach().float().clone(),
        b_V=_stack(bridge, "b_V", (n_layers, n_kv, d_head)),
        W_O=bridge.W_O.detach().float().clone(),
        b_O=_stack(bridge, "b_O", (n_layers, d_model)),
        W_in=bridge.W_in.detach().float().clone(),
        b_in=_stack(bridge, "b_in", (n_layers, d_mlp)),
        W_gate=W_gate,
        W_out=bridge.W_out.detach().float().clone(),
        b_out=_stack(bridge, "b_out", (n_layers, d_model)),
        W_U=bridge.W_U.detach().float().clone(),
        b_U=_stack(bridge, "b_U", (bridge.W_U.shape[1],)),
        W_E=bridge.W_E.detach().float().clone(),
        W_pos=bridge.W_pos.detach().float().clone() if cfg.positional_embedding_type == "standard" else None,
        norm="RMS" if cfg.normalization_type.startswith("RMS") else "LN",
        eps=float(cfg.eps),
        parallel=bool(cfg.parallel_attn_mlp),
        act_fn=act,
        attn_scale=float(attn_scale),
        cos=cos,
        sin=sin,
    )
