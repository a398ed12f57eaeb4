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
    """Every weight the forward pass needs, stacked by layer and laid out for one GEMM each.

    Queries, keys and values share one `[d_model, (head + 2·kv)·d_head]` matrix (GQA
    models keep their `kv` key/value heads), and a gated MLP's gate and input
    projections share one `[d_model, 2·d_mlp]` matrix (gate first). All-zero biases are
    None, so bias-free models skip the additions.
    """

    W_QKV: Float[Tensor, "layer d_model qkv"]
    b_QKV: Float[Tensor, "layer qkv"] | None
    W_O: Float[Tensor, "layer head d_head d_model"]
    b_O: Float[Tensor, "layer d_model"]
    W_in: Float[Tensor, "layer d_model mlp_in"]  # [gate | in] when gated
    b_in: Float[Tensor, "layer d_mlp"] | None
    W_out: Float[Tensor, "layer d_mlp d_model"]
    b_out: Float[Tensor, "layer d_model"] | None
    W_U: Float[Tensor, "d_model d_vocab"]
    b_U: Float[Tensor, "d_vocab"]
    W_E: Float[Tensor, "d_vocab d_model"]
    W_pos: Float[Tensor, "n_ctx d_model"] | None  # learned absolute positions (GPT-2) only
    n_heads: int
    n_kv: int
    gated: bool
    norm: str  # "LN" (centre and scale) or "RMS" (scale only)
    eps: float
    parallel: bool
    act_fn: str
    attn_scale: float  # scores are divided by this
    cos: Float[Tensor, "pos rot"] | None  # rotary tables, HF rotate-half layout
    sin: Float[Tensor, "pos rot"] | None

    @property
    def n_layers(self) -> int:
        return self.W_O.shape[0]

    @property
    def d_model(self) -> int:
        return self.W_O.shape[3]

    @property
    def d_head(self) -> int:
        return self.W_O.shape[2]

    @property
    def d_mlp(self) -> int:
        return self.W_out.shape[1]

    def act(self, x: Tensor) -> Tensor:
        return _ACTS[self.act_fn](x)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "ModelWeights":
        moved = {}
        for name, value in self.__dict__.items():
            moved[name] = value.to(device=device, dtype=dtype) if isinstance(value, Tensor) else value
        return ModelWeights(**moved)


def _or_none(t: Tensor) -> Tensor | None:
    return None if not bool(t.any()) else t


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
    act = cfg.act_fn
    if act not in _ACTS:
        raise ConfigError(f"activation function {act!r} is not supported by the fast engine")
    if cfg.normalization_type not in ("LN", "LNPre", "RMS", "RMSPre"):
        raise ConfigError(f"normalization {cfg.normalization_type!r} is not supported")
    get = lambda name: getattr(bridge, name).detach().float()  # noqa: E731
    W_K = get("W_K")
    n_kv = W_K.shape[1]  # some adapters expose keys already expanded to every query head
    d_mlp = bridge.W_in.shape[-1]
    # [layer, head, d_model, d_head] -> [layer, d_model, head·d_head], Q then K then V.
    flat = lambda w: w.permute(0, 2, 1, 3).reshape(n_layers, d_model, -1)  # noqa: E731
    W_QKV = torch.cat([flat(get("W_Q")), flat(W_K), flat(get("W_V"))], -1).contiguous()
    b_QKV = torch.cat([
        _stack(bridge, "b_Q", (n_layers, n_heads, d_head)).reshape(n_layers, -1),
        _stack(bridge, "b_K", (n_layers, n_kv, d_head)).reshape(n_layers, -1),
        _stack(bridge, "b_V", (n_layers, n_kv, d_head)).reshape(n_layers, -1),
    ], -1)
    gated = bool(getattr(cfg, "gated_mlp", False))
    W_in = torch.cat([get("W_gate"), get("W_in")], -1).contiguous() if gated else get("W_in").clone()
    attn_scale = cfg.attn_scale if cfg.attn_scale and cfg.attn_scale > 0 else d_head**0.5
    if not getattr(cfg, "use_attn_scale", True):
        attn_scale = 1.0
    cos, sin = _rotary_tables(bridge, seq_len)
    return ModelWeights(
        W_QKV=W_QKV,
        b_QKV=_or_none(b_QKV),
        W_O=get("W_O").clone(),
        b_O=_stack(bridge, "b_O", (n_layers, d_model)),
        W_in=W_in,
        b_in=_or_none(_stack(bridge, "b_in", (n_layers, d_mlp))),
        W_out=get("W_out").clone(),
        b_out=_or_none(_stack(bridge, "b_out", (n_layers, d_model))),
        W_U=get("W_U").clone(),
        b_U=_stack(bridge, "b_U", (bridge.W_U.shape[1],)),
        W_E=get("W_E").clone(),
        W_pos=get("W_pos").clone() if cfg.positional_embedding_type == "standard" else None,
        n_heads=n_heads,
        n_kv=n_kv,
        gated=gated,
        norm="RMS" if cfg.normalization_type.startswith("RMS") else "LN",
        eps=float(cfg.eps),
        parallel=bool(cfg.parallel_attn_mlp),
        act_fn=act,
        attn_scale=float(attn_scale),
        cos=cos,
        sin=sin,
    )
