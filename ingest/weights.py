"""What the definitions need from a model, read from its own Hugging Face modules.

DESIGN.md states every DE with TransformerLens's processed weights: the final norm's
gain folded into `W_U`, `W_U` centred over the vocabulary (and over d_model where the
norm subtracts a mean), the value bias (with the pre-norm bias folded into it) moved
into `b_O`. The same numbers follow from the unprocessed modules:

- `u = centre(g ⊙ W_U[:, y] · logit_scale)`: a component's DE is `c · u / s`, and the
  d_model centring makes writing-weight centring unnecessary;
- the processed `hook_z` of a head is its o_proj input minus `c_h`, the z the head makes
  when the layer's input is all zeros (its value vector is then exactly the value bias
  plus the norm bias times W_V, and attention weights sum to 1).

With `--preset paper` a Llama model is read as the authors loaded LLaMA-7B
(`fold_ln=False, center_writing_weights=False, center_unembed=False`): `u = W_U[:, y]`, the
raw unembedding column, with neither the final norm's gain nor any centring. That is the DE
their `collect_direct_effect` computed (`apply_ln_to_stack` divides by the final scale but
never multiplies by the gain; `tokens_to_residual_directions` is `W_U[:, y]`), so the logit
the components sum to is the model's uncentred logit with the final norm's gain set to 1
(`UNFOLDED`). The self-check and the tests check that identity.

Norm parameters are probed from the module and its formula is asserted on random
input, so a norm that is neither LayerNorm nor RMSNorm is refused, never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from selfrepair.errors import UnsupportedModel
from selfrepair.ingest.conventions import PROCESSED, UNFOLDED, convention_for
from selfrepair.ingest.families import Family, family_of, module_at
from selfrepair.ingest.layer_calls import capture_calls

_EPS_ATTRS = ("eps", "variance_epsilon", "epsilon")
@dataclass
class Norm:
    """A LayerNorm (`LN`: centre, scale) or RMSNorm (`RMS`: scale) with its gain and bias."""

    kind: str
    eps: float
    gain: Float[Tensor, "d_model"]
    bias: Float[Tensor, "d_model"]

    def scale(self, x: Tensor) -> Tensor:
        """`hook_scale`: sqrt(mean((x − μ)²) + eps) for LN, sqrt(mean(x²) + eps) for RMS; [...]."""
        x = x.float()
        if self.kind == "LN":
            x = x - x.mean(-1, keepdim=True)
        return (x.pow(2).mean(-1) + self.eps).sqrt()

    def apply(self, x: Tensor) -> Tensor:
        x = x.float()
        if self.kind == "LN":
            x = x - x.mean(-1, keepdim=True)
        return x / self.scale(x)[..., None] * self.gain + self.bias


def probe_norm(module, d: int, where: str) -> Norm:
    """Read a norm module's kind, eps, gain and bias by feeding it known inputs, then check it.

    Zeros give the bias (the normalised part is 0); an alternating ±1 vector (mean 0,
    mean square 1, so s = sqrt(1 + eps) for either kind) gives the gain. The kind is the
    formula that reproduces the module on random input.
    """
    eps = next((float(getattr(module, a)) for a in _EPS_ATTRS if isinstance(getattr(module, a, None), (int, float))), None)
    if d % 2:
        raise UnsupportedModel(f"{where}: {type(module).__name__} is not a LayerNorm or RMSNorm selfrepair can read")
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    # Large inputs check the formula, tiny ones (variance near eps) check eps itself.
    xs = [torch.randn(3, 5, d, generator=g).to(device) * 2 + 0.5, torch.randn(3, 5, d, generator=g).to(device) * 3e-3]
    # A norm that keeps eps out of its attributes (OLMo's) is matched against the usual values.
    for eps in [eps] if eps is not None else [1e-5, 1e-6, 1e-8, 1e-12]:
        with torch.no_grad():
            bias = module(torch.zeros(1, d, device=device)).float()[0]
            alt = torch.tensor([1.0, -1.0] * (d // 2), device=device)
            gain = (module(alt[None]).float()[0] - bias) * (1 + eps) ** 0.5 / alt
            for kind in ("LN", "RMS"):
                norm = Norm(kind, eps, gain, bias)
                if all(torch.allclose(norm.apply(x), want := module(x).float(), rtol=1e-4,
                                      atol=1e-5 * float(want.abs().max())) for x in xs):
                    return norm
    raise UnsupportedModel(f"{where}: {type(module).__name__} computes neither LayerNorm nor RMSNorm")


def in_major(module, where: str) -> Tensor:
    """A projection's weight as [in, out] (nn.Linear stores [out, in]; GPT-2's Conv1D [in, out])."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return module.weight.detach().float()
    if isinstance(module, torch.nn.Linear):
        return module.weight.detach().float().T
    raise UnsupportedModel(f"{where}: {type(module).__name__} is not a linear projection")


def _bias(module, d: int, device) -> Tensor:
    b = getattr(module, "bias", None)
    return b.detach().float() if isinstance(b, Tensor) else torch.zeros(d, device=device)


def _config_int(cfg, *names) -> int | None:
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


@dataclass
class Weights:
    """Module handles and processed weights of one Hugging Face causal LM (float32).

    `W_O` is each head's rows of the attention output projection, `c` the z each head
    makes from a zero input (the folded value bias), `b_attn` the attention write of a
    zero input (o_proj bias plus every head's c @ W_O). Post-norm gains are folded into
    `W_O_eff` and `W_out_final`, so a head's DE is `z · (W_O_eff @ u) / s_post / s`.
    """

    family: Family
    model: torch.nn.Module
    layers: list
    attn_out: list
    mlp_write: list  # the module whose output is added to the residual (the post-norm if any)
    mlp_out: list  # the MLP's own output (the post-norm's input)
    down_final: torch.nn.Module | None  # None for a mixture of experts: no final-MLP neurons
    layer_norms: list[list[tuple[str, torch.nn.Module, Norm]]]
    final: Norm
    attn_post: list[Norm | None]
    mlp_post: list[Norm | None]
    W_O: Float[Tensor, "layer head d_head d_model"]
    W_O_eff: Float[Tensor, "layer head d_head d_model"]
    c: Float[Tensor, "layer head d_head"]
    b_attn: Float[Tensor, "layer d_model"]
    W_U: Float[Tensor, "d_model d_vocab"]  # processed: gain folded, centred
    b_U: Float[Tensor, "d_vocab"]
    W_out_final: Float[Tensor, "d_mlp d_model"]  # post-norm gain folded; d_mlp = 0 for a mixture of experts
    n_heads: int
    parallel: bool
    softcap: float | None
    logit_scale: float  # Cohere multiplies its logits by this; 1 elsewhere
    convention: str = PROCESSED  # PROCESSED or UNFOLDED: what W_U (and so every DE and logit) means

    @property
    def n_layers(self) -> int:
        return self.W_O.shape[0]

    @property
    def d_head(self) -> int:
        return self.W_O.shape[2]

    @property
    def d_model(self) -> int:
        return self.W_O.shape[3]

    @property
    def d_mlp(self) -> int:
        return self.W_out_final.shape[0]

    @property
    def post_norm(self) -> bool:
        return self.attn_post[0] is not None

    @property
    def norm_names(self) -> list[str]:
        return [name for norms in self.layer_norms for name, _, _ in norms] + [self.family.final_norm]

    def target_columns(self, next_tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        """u for each position's correct next token: its processed unembedding column."""
        return self.W_U.T[next_tokens]


def norm_children(layer) -> list[tuple[str, torch.nn.Module]]:
    """A decoder layer's own norms (name, module), in order: the norm scales stored per layer."""
    return [(name, child) for name, child in layer.named_children() if "norm" in type(child).__name__.lower()]


def read_weights(model, seq_len: int, preset: str | None = None) -> Weights:
    """Resolve a loaded causal LM's modules and read its processed weights.

    Args:
        model: the Hugging Face causal LM.
        seq_len: tokens per row (the zero-input z is computed at this length).
        preset: the run's preset; `paper` reads a Llama model unfolded (UNFOLDED).

    Raises:
        UnsupportedModel: the architecture, a norm or a projection is not one we can read.
    """
    family = family_of(model)
    cfg = model.config
    layers = list(module_at(model, family.layers))
    d = _config_int(cfg, "hidden_size", "n_embd", "d_model")
    n_heads = _config_int(cfg, "num_attention_heads", "n_head", "num_heads")
    if d is None or n_heads is None:
        raise UnsupportedModel(f"{family.name}: the config does not give hidden_size and the head count")
    at = lambda layer, path: module_at(layers[layer], path)  # noqa: E731
    attn_out = [at(i, family.attn_out) for i in range(len(layers))]
    W = torch.stack([in_major(m, f"{family.name} {family.attn_out}") for m in attn_out])  # [layer, H·d_head, d_model]
    if W.shape[1] % n_heads or W.shape[2] != d:
        raise UnsupportedModel(f"{family.name}: attention output projection of shape {tuple(W.shape[1:])} "
                               f"does not split into {n_heads} heads writing d_model {d}")
    device = W.device
    W_O = W.view(len(layers), n_heads, -1, d)
    post = lambda path, i: probe_norm(at(i, path), d, f"{family.name} {path}") if path else None  # noqa: E731
    attn_post = [post(family.attn_post, i) for i in range(len(layers))]
    mlp_post = [post(family.mlp_post, i) for i in range(len(layers))]
    for n in (x for x in attn_post + mlp_post if x is not None):
        if n.kind != "RMS" or bool(n.bias.any()):
            raise UnsupportedModel(f"{family.name}: a post-norm with a mean or bias is not supported")
    g_attn = torch.stack([n.gain if n else torch.ones(d, device=device) for n in attn_post])
    final_module = module_at(model, family.final_norm)
    final = probe_norm(final_module, d, f"{family.name} {family.final_norm}")
    lm_head = model.get_output_embeddings()
    W_lm = in_major(lm_head, f"{family.name} unembedding")  # [d_model, d_vocab]
    logit_scale = float(getattr(cfg, "logit_scale", None) or 1.0) if family.name == "Cohere" else 1.0
    convention = convention_for(family.name, preset)
    if convention == UNFOLDED:
        _check_unfoldable(family.name, final, cfg, logit_scale)
        # No gain, no centring: the raw unembedding, as TransformerLens's W_U with fold_ln=False.
        W_U, b_U = W_lm, _bias(lm_head, W_lm.shape[1], device)
    else:
        W_U = (final.gain[:, None] * W_lm) * logit_scale
        b_U = (final.bias @ W_lm + _bias(lm_head, W_lm.shape[1], device)) * logit_scale
        W_U, b_U = W_U - W_U.mean(1, keepdim=True), b_U - b_U.mean()
        if final.kind == "LN":
            W_U = W_U - W_U.mean(0, keepdim=True)
    if family.moe:  # routed experts: no single down projection, so no neurons (d_mlp 0)
        down_final, W_out = None, torch.zeros(0, d, device=device)
    else:
        down_final = at(len(layers) - 1, family.down)
        W_out = in_major(down_final, f"{family.name} {family.down}")
    if mlp_post[-1] is not None:
        W_out = W_out * mlp_post[-1].gain
    mlp_out = [at(i, family.mlp_out) for i in range(len(layers))]
    mlp_write = [at(i, family.mlp_post) for i in range(len(layers))] if family.mlp_post else mlp_out
    layer_norms = []
    for i, layer in enumerate(layers):
        norms = []
        for name, child in norm_children(layer):
            norms.append((f"{family.layers}.{i}.{name}", child, probe_norm(child, d, f"{family.name} {name}")))
        layer_norms.append(norms)
    w = Weights(
        family=family, model=model, layers=layers, attn_out=attn_out, mlp_write=mlp_write, mlp_out=mlp_out,
        down_final=down_final, layer_norms=layer_norms, final=final, attn_post=attn_post, mlp_post=mlp_post,
        W_O=W_O, W_O_eff=W_O * g_attn[:, None, None, :], c=torch.zeros(len(layers), n_heads, W_O.shape[2], device=device),
        b_attn=torch.zeros(len(layers), d, device=device), W_U=W_U.contiguous(), b_U=b_U, W_out_final=W_out,
        n_heads=n_heads, parallel=family.parallel(cfg),
        softcap=getattr(cfg, "final_logit_softcapping", None), logit_scale=logit_scale, convention=convention,
    )
    if convention == UNFOLDED and w.post_norm:
        raise UnsupportedModel(f"{family.name}: the paper preset's unfolded weights assume no post-norm blocks")
    w.c = _zero_input_z(w, seq_len)
    w.b_attn = torch.stack([
        w.c[i].flatten() @ W[i] + _bias(attn_out[i], d, device) for i in range(len(layers))])
    if w.post_norm and bool(w.b_attn.any()):
        # Through a post-norm the bias write rescales under ablation and belongs to no head,
        # so Σ ΔDE would miss it and the LayerNorm identity would not hold.
        raise UnsupportedModel(f"{family.name}: post-norm blocks with attention biases are not supported "
                               "(released checkpoints of this family have none)")
    return w


def _zero_input_z(w: Weights, seq_len: int) -> Float[Tensor, "layer head d_head"]:
    """Each head's z when its layer's input is all zeros: the folded value bias, constant over positions."""
    device = w.W_O.device
    rows = torch.zeros((1, seq_len), dtype=torch.long, device=device)
    calls, _, _ = capture_calls(w.model, w.layers, rows)
    out = []
    for i, layer in enumerate(w.layers):
        seen = {}
        hook = w.attn_out[i].register_forward_pre_hook(lambda m, a, seen=seen: seen.__setitem__("z", a[0]))
        try:
            with torch.no_grad():
                calls[i].run(layer, torch.zeros(1, seq_len, w.d_model, device=device), 1, 1)
        finally:
            hook.remove()
        z = seen["z"].float()[0].view(seq_len, w.n_heads, w.d_head)
        c = z.mean(0)
        if float((z - c).abs().max()) > 1e-4 * (1 + float(c.abs().max())):
            raise UnsupportedModel(f"{w.family.name}: a head's output at zero input varies with position, "
                                   "so its value bias cannot be folded")
        out.append(c)
    return torch.stack(out)


def _check_unfoldable(family: str, final: Norm, cfg, logit_scale: float) -> None:
    """The unfolded convention is defined for the authors' architecture only: assert it, never assume it."""
    problems = []
    if final.kind != "RMS":
        problems.append(f"its final norm is {final.kind}, not RMSNorm")
    if bool(final.bias.any()):
        problems.append("its final norm has a bias")
    if logit_scale != 1.0 or getattr(cfg, "final_logit_softcapping", None):
        problems.append("its logits are scaled or softcapped")
    if problems:
        raise UnsupportedModel(f"{family}: the paper preset reads Llama models as the authors read LLaMA-7B, "
                               f"but this one differs ({'; '.join(problems)})")
