"""Independent recomputation of the store's numbers with plain transformers (no TransformerLens,
no selfrepair code): the reference that the ingest of every family is checked against.

Everything is read off the Hugging Face model's own forward pass through hooks, in HF
coordinates, and the DESIGN.md definitions are applied on top (float64 arithmetic):

- w_col = W_U[:, y] − mean_v W_U[:, v] (lm_head weight, times Cohere's logit_scale);
  u = g ⊙ w_col, centred over d_model when the final norm subtracts the mean;
  s = the final norm's scale; centred logit = x·u/s + b_eff[y] with
  b_eff = (β·W_U + b_lm) − mean_v(·). This equals HF's own (pre-softcap) logit minus its
  vocab mean.
- A head writes (z_h − c_h) @ W_O[h] (z: the input of the attention output projection,
  head-major; c_h: that head's z when the layer's input is all zeros, i.e. value bias and
  pre-norm bias through W_V), through g_post/s_post in post-norm blocks. An MLP writes its
  output with bias (through its post-norm when there is one). The rest (embeddings, b_O,
  Σ c_h W_O[h]) is `de_other`.
- Ablation patches the head's slice of the output projection's input in every position of
  every row; everything downstream is recomputed by the model itself; every DE of the
  ablated run uses the clean scale s.
- Output metrics (`output_metrics`): full-vocabulary float64 softmaxes of the model's own final
  logits (softcap and logit scale included), clean and ablated: d_loss, KL(clean ‖ ablated),
  d_entropy, top1_changed, and the clean loss and entropy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class Spec:
    """Where things live in one family's HF module tree (paths relative to the model / a layer)."""

    layers: str
    o_proj: str  # the attention output projection (its input is z, head-major)
    mlp_out: str  # the module whose output is the MLP's contribution to the residual
    final_norm: str
    norm: str = "ln"  # final norm: ln (mean-subtracting), ln_noparam, rms, rms1p (gain 1 + weight)
    attn_post: str | None = None  # post-norm on the attention output (RMS), if any
    post_norm: str = "rms"  # rms or rms1p for the post-norms
    logit_scale: str | None = None  # config attribute multiplying the logits
    softcap: str | None = None  # config attribute of the final-logit softcap (applied after lm_head)
    down: str | None = None  # the MLP's output projection when `mlp_out` is its post-norm (post-norm families)
    notes: str = ""


SPECS: dict[str, Spec] = {
    "gpt2": Spec("transformer.h", "attn.c_proj", "mlp.c_proj", "transformer.ln_f",
                 notes="Conv1D weights [in, out]; fused c_attn"),
    "neox": Spec("gpt_neox.layers", "attention.dense", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm",
                 notes="parallel attention/MLP, fused query_key_value, partial rotary"),
    "llama": Spec("model.layers", "self_attn.o_proj", "mlp.down_proj", "model.norm", "rms"),
    "mistral": Spec("model.layers", "self_attn.o_proj", "mlp.down_proj", "model.norm", "rms",
                    notes="sliding window"),
    "mixtral": Spec("model.layers", "self_attn.o_proj", "mlp", "model.norm", "rms",
                    notes="MLP = sparse MoE block output"),
    "qwen2moe": Spec("model.layers", "self_attn.o_proj", "mlp", "model.norm", "rms",
                     notes="MLP = sparse MoE block output plus the gated shared expert"),
    "qwen3moe": Spec("model.layers", "self_attn.o_proj", "mlp", "model.norm", "rms",
                     notes="MLP = sparse MoE block output; q/k RMSNorm"),
    "olmoe": Spec("model.layers", "self_attn.o_proj", "mlp", "model.norm", "rms",
                  notes="MLP = sparse MoE block output; q/k RMSNorm over all heads"),
    "qwen2": Spec("model.layers", "self_attn.o_proj", "mlp.down_proj", "model.norm", "rms"),
    "qwen3": Spec("model.layers", "self_attn.o_proj", "mlp.down_proj", "model.norm", "rms", notes="q/k RMSNorm"),
    "gemma": Spec("model.layers", "self_attn.o_proj", "mlp.down_proj", "model.norm", "rms1p",
                  notes="embedding × sqrt(d_model); gain 1 + weight"),
    "gemma2": Spec("model.layers", "self_attn.o_proj", "post_feedforward_layernorm", "model.norm", "rms1p",
                   attn_post="post_attention_layernorm", post_norm="rms1p", softcap="final_logit_softcapping",
                   down="mlp.down_proj", notes="post-norms; post_attention_layernorm is the attention POST-norm"),
    "gemma3": Spec("model.layers", "self_attn.o_proj", "post_feedforward_layernorm", "model.norm", "rms1p",
                   attn_post="post_attention_layernorm", post_norm="rms1p", softcap="final_logit_softcapping",
                   down="mlp.down_proj", notes="post-norms, q/k norms"),
    "phi": Spec("model.layers", "self_attn.dense", "mlp.fc2", "model.final_layernorm",
                notes="parallel block on one LayerNorm; lm_head bias"),
    "phi3": Spec("model.layers", "self_attn.o_proj", "mlp.down_proj", "model.norm", "rms",
                 notes="fused qkv_proj and gate_up_proj"),
    "opt": Spec("model.decoder.layers", "self_attn.out_proj", "fc2", "model.decoder.final_layer_norm",
                notes="MLP is fc1/fc2 directly on the layer"),
    "gptj": Spec("transformer.h", "attn.out_proj", "mlp.fc_out", "transformer.ln_f",
                 notes="parallel; out_proj has no bias; lm_head bias"),
    "gptneo": Spec("transformer.h", "attn.attention.out_proj", "mlp.c_proj", "transformer.ln_f",
                   notes="local/global attention, no score scaling"),
    "olmo": Spec("model.layers", "self_attn.o_proj", "mlp.down_proj", "model.norm", "ln_noparam",
                 notes="LayerNorm without parameters"),
    "olmo2": Spec("model.layers", "self_attn.o_proj", "post_feedforward_layernorm", "model.norm", "rms",
                  attn_post="post_attention_layernorm", post_norm="rms", down="mlp.down_proj",
                  notes="post-norm only (no pre-norms); q/k norm over the whole projection"),
    "stablelm": Spec("model.layers", "self_attn.o_proj", "mlp.down_proj", "model.norm",
                     notes="per-head q/k LayerNorm"),
    "falcon": Spec("transformer.h", "self_attention.dense", "mlp.dense_4h_to_h", "transformer.ln_f",
                   notes="new decoder architecture: parallel, ln_attn + ln_mlp, fused qkv"),
    "bloom": Spec("transformer.h", "self_attention.dense", "mlp.dense_4h_to_h", "transformer.ln_f",
                  notes="attention and MLP modules return residual + output; ALiBi; embedding LayerNorm"),
    "gptbigcode": Spec("transformer.h", "attn.c_proj", "mlp.c_proj", "transformer.ln_f", notes="multi-query"),
    "cohere": Spec("model.layers", "self_attn.o_proj", "mlp.down_proj", "model.norm", logit_scale="logit_scale",
                   notes="parallel; LayerNorm without bias; logit_scale"),
}


def _get(root: torch.nn.Module, path: str) -> torch.nn.Module:
    return root.get_submodule(path)


def _family(model) -> str:
    name = type(model).__name__
    table = {"GPT2LMHeadModel": "gpt2", "GPTNeoXForCausalLM": "neox", "LlamaForCausalLM": "llama",
             "MistralForCausalLM": "mistral", "MixtralForCausalLM": "mixtral", "Qwen2ForCausalLM": "qwen2",
             "Qwen3ForCausalLM": "qwen3", "GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2",
             "Gemma3ForCausalLM": "gemma3", "PhiForCausalLM": "phi", "Phi3ForCausalLM": "phi3",
             "OPTForCausalLM": "opt", "GPTJForCausalLM": "gptj", "GPTNeoForCausalLM": "gptneo",
             "OlmoForCausalLM": "olmo", "Olmo2ForCausalLM": "olmo2", "StableLmForCausalLM": "stablelm",
             "FalconForCausalLM": "falcon", "BloomForCausalLM": "bloom", "GPTBigCodeForCausalLM": "gptbigcode",
             "CohereForCausalLM": "cohere", "Qwen2MoeForCausalLM": "qwen2moe", "Qwen3MoeForCausalLM": "qwen3moe",
             "OlmoeForCausalLM": "olmoe"}
    return table[name]


def _eps(mod) -> float:
    for attr in ("eps", "variance_epsilon"):
        if hasattr(mod, attr):
            return float(getattr(mod, attr))
    return 1e-5  # OlmoLayerNorm hard-codes 1e-5


def _gain(mod, kind: str, d: int) -> torch.Tensor:
    w = getattr(mod, "weight", None)
    if kind == "ln_noparam" or w is None:
        return torch.ones(d, dtype=torch.float64)
    w = w.detach().double()
    return 1.0 + w if kind == "rms1p" else w


def _scale(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """The norm's scale of x [..., d] (float64)."""
    if kind.startswith("ln"):
        return torch.sqrt(((x - x.mean(-1, keepdim=True)) ** 2).mean(-1) + eps)
    return torch.sqrt((x ** 2).mean(-1) + eps)


class Model:
    """A family's HF model with its spec and the weights the recomputation needs (float64)."""

    def __init__(self, model, family: str | None = None):
        self.hf = model
        self.family = family or _family(model)
        self.spec = SPECS[self.family]
        cfg = model.config
        self.layers = list(_get(model, self.spec.layers))
        self.n_layers = len(self.layers)
        o0 = _get(self.layers[0], self.spec.o_proj)
        self.n_heads = int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
                           or getattr(cfg, "num_heads"))
        self.W_O, self.b_O = [], []
        for layer in self.layers:
            o = _get(layer, self.spec.o_proj)
            w = o.weight.detach().double()
            w = w if type(o).__name__ == "Conv1D" else w.T  # -> [in = H * d_head, out = d_model]
            self.W_O.append(w.reshape(self.n_heads, -1, w.shape[1]))
            self.b_O.append(o.bias.detach().double() if getattr(o, "bias", None) is not None
                            else torch.zeros(w.shape[1], dtype=torch.float64))
        self.d_head = self.W_O[0].shape[1]
        self.d_model = self.W_O[0].shape[2]
        del o0
        norm = _get(model, self.spec.final_norm)
        self.final_norm = norm
        self.norm_eps = _eps(norm)
        self.g = _gain(norm, self.spec.norm, self.d_model)
        b = getattr(norm, "bias", None)
        self.beta = b.detach().double() if b is not None else torch.zeros(self.d_model, dtype=torch.float64)
        head = model.get_output_embeddings()
        self.lm_head = head
        ls = float(getattr(cfg, self.spec.logit_scale)) if self.spec.logit_scale else 1.0
        self.logit_scale = ls
        self.W_U = head.weight.detach().double() * ls  # [vocab, d_model]
        self.b_U = (head.bias.detach().double() * ls if getattr(head, "bias", None) is not None
                    else torch.zeros(self.W_U.shape[0], dtype=torch.float64))
        full_b = self.W_U @ self.beta + self.b_U
        self.b_eff = full_b - full_b.mean()
        self.W_U_centred = self.W_U - self.W_U.mean(0, keepdim=True)
        self.softcap = getattr(cfg, self.spec.softcap, None) if self.spec.softcap else None
        if self.spec.attn_post:
            self.attn_post = [_get(l, self.spec.attn_post) for l in self.layers]
            self.g_post = [_gain(m, self.spec.post_norm, self.d_model) for m in self.attn_post]
            self.post_eps = [_eps(m) for m in self.attn_post]
        # The final MLP's output projection: its input is the neurons' activations.
        # (None for a mixture-of-experts MLP, which has no single output projection: no neurons.)
        last = self.layers[-1]
        self.down_final = _get(last, self.spec.down or self.spec.mlp_out)
        w = getattr(self.down_final, "weight", None)
        self.W_out_final = (None if w is None else w.detach().double() if type(self.down_final).__name__ == "Conv1D"
                            else w.detach().double().T)  # [d_mlp, d_model]
        if self.spec.down:  # the MLP's post-norm sits between the projection and the residual
            self.mlp_post_final = _get(last, self.spec.mlp_out)
            self.g_mlp_post = _gain(self.mlp_post_final, self.spec.post_norm, self.d_model)
            self.mlp_post_eps = _eps(self.mlp_post_final)

    def u(self, y: torch.Tensor) -> torch.Tensor:
        """[N] target ids -> [N, d_model] effective unembedding directions."""
        u = self.g * self.W_U_centred[y]
        if self.spec.norm.startswith("ln"):
            u = u - u.mean(-1, keepdim=True)
        return u


@dataclass
class Run:
    z: list[torch.Tensor]  # per layer [row, seq, H, d_head] float32 (HF coordinates)
    mlp: list[torch.Tensor]  # per layer [row, seq, d] (MLP contribution)
    attn_post_in: list[torch.Tensor]  # per layer [row, seq, d] (post-norm input), post-norm families only
    h0: torch.Tensor  # input of layer 0
    x: torch.Tensor  # input of the final norm
    lm: torch.Tensor  # lm_head output (pre-softcap, without logit_scale)
    logits: torch.Tensor  # the model's final logits
    post_final: torch.Tensor | None = None  # [row, seq, d_mlp] the final MLP's neuron activations
    mlp_post_in: torch.Tensor | None = None  # [row, seq, d] input of the final MLP's post-norm (post-norm families)


def _hidden_arg(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def run(m: Model, rows: torch.Tensor, patch=None, zero_layer_inputs: bool = False) -> Run:
    """One forward pass of the HF model with hooks; `patch = (layer, head, z_new [row, seq, d_head])`."""
    z, mlp, post_in, store = {}, {}, {}, {}
    hooks = []
    H, dh = m.n_heads, m.d_head
    try:
        for l, layer in enumerate(m.layers):
            def o_pre(mod, args, l=l):
                x = args[0]
                if patch is not None and patch[0] == l:
                    x = x.clone()
                    view = x.view(*x.shape[:-1], H, dh)
                    view[..., patch[1], :] = patch[2].to(x.dtype)
                    args = (x,) + tuple(args[1:])
                z[l] = x.detach().reshape(*x.shape[:-1], H, dh).clone()
                return args
            hooks.append(_get(layer, m.spec.o_proj).register_forward_pre_hook(o_pre))

            def mlp_hook(mod, args, out, l=l):
                mlp[l] = (out[0] if isinstance(out, tuple) else out).detach().clone()
            hooks.append(_get(layer, m.spec.mlp_out).register_forward_hook(mlp_hook))
            if m.spec.attn_post:
                def post_pre(mod, args, l=l):
                    post_in[l] = args[0].detach().clone()
                hooks.append(m.attn_post[l].register_forward_pre_hook(post_pre))
            if zero_layer_inputs:
                def zero_pre(mod, args, kwargs):
                    if args:
                        return (torch.zeros_like(args[0]),) + tuple(args[1:]), kwargs
                    kwargs = dict(kwargs, hidden_states=torch.zeros_like(kwargs["hidden_states"]))
                    return args, kwargs
                hooks.append(layer.register_forward_pre_hook(zero_pre, with_kwargs=True))

        def h0_pre(mod, args, kwargs):
            store["h0"] = _hidden_arg(args, kwargs).detach().clone()
        hooks.insert(0, m.layers[0].register_forward_pre_hook(h0_pre, with_kwargs=True))

        def x_pre(mod, args):
            store["x"] = args[0].detach().clone()
        hooks.append(m.final_norm.register_forward_pre_hook(x_pre))

        def lm_hook(mod, args, out):
            store["lm"] = out.detach().clone()
        hooks.append(m.lm_head.register_forward_hook(lm_hook))

        def down_pre(mod, args):
            store["post"] = args[0].detach().clone()
        hooks.append(m.down_final.register_forward_pre_hook(down_pre))
        if m.spec.down:
            def mlp_post_pre(mod, args):
                store["mlp_post_in"] = args[0].detach().clone()
            hooks.append(m.mlp_post_final.register_forward_pre_hook(mlp_post_pre))
        logits = m.hf(input_ids=rows, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    L, shape = m.n_layers, (*rows.shape, -1)  # OPT's fc2 sees [row * seq, d]: reshape every capture
    return Run([z[l] for l in range(L)], [mlp[l].reshape(shape) for l in range(L)],
               [post_in[l].reshape(shape) for l in range(L)] if m.spec.attn_post else [],
               store["h0"], store["x"], store["lm"], logits.detach(), store["post"].reshape(shape),
               store["mlp_post_in"].reshape(shape) if "mlp_post_in" in store else None)


def _pred(t: torch.Tensor) -> torch.Tensor:
    """[row, seq, ...] -> prediction positions flattened row-major [row * (seq - 1), ...] float64."""
    return t[:, :-1].reshape(-1, *t.shape[2:]).double()


@dataclass
class Clean:
    rows: torch.Tensor
    run: Run
    c: list[torch.Tensor]  # per layer [H, d_head]: each head's z on an all-zero layer input
    y: torch.Tensor  # [N] next token ids
    u: torch.Tensor  # [N, d]
    s: np.ndarray  # [N] final-norm scale
    logit: np.ndarray  # [N] centred logit of the correct next token
    b_eff: np.ndarray  # [N] b_eff[y]
    hf_logit: np.ndarray  # [N] HF's own pre-softcap logit minus its vocab mean
    de_heads: np.ndarray  # [L, H, N]
    de_mlps: np.ndarray  # [L, N]
    de_bias: np.ndarray  # [L, N] b_O + Σ_h c_h W_O[h] (through the post-norm when there is one)
    de_other: np.ndarray  # [N] embeddings and all bias terms
    extra: dict = field(default_factory=dict)


def _head_vecs(m: Model, r: Run, c: list[torch.Tensor], l: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Head writes [H, N, d] and the layer's bias write [N, d] in one run (processed z)."""
    zp = _pred(r.z[l]) - c[l][None]  # [N, H, dh]
    vec = torch.einsum("nhk,hkd->hnd", zp, m.W_O[l])
    bias = (c[l][:, :, None] * m.W_O[l]).sum((0, 1)) + m.b_O[l]
    bias = bias.expand(vec.shape[1], -1)
    if m.spec.attn_post:
        s_post = _scale(_pred(r.attn_post_in[l]), m.spec.post_norm, m.post_eps[l])[:, None]
        vec = m.g_post[l] * vec / s_post
        bias = m.g_post[l] * bias / s_post
    return vec, bias


def neuron_des(m: Model, r: Run, u: torch.Tensor, s: torch.Tensor) -> np.ndarray:
    """Each final-MLP neuron's DE in run `r` with the clean scale `s`: post_n · W_out[n] · u / s, [N, d_mlp].

    In post-norm blocks a neuron writes through the MLP's post-norm: g_post ⊙ (post_n W_out[n]) / s_post,
    s_post the post-norm's scale in the same run.
    """
    post = _pred(r.post_final)  # [N, d_mlp]
    if m.spec.down:
        s_post = _scale(_pred(r.mlp_post_in), m.spec.post_norm, m.mlp_post_eps)
        wu = (u * m.g_mlp_post) @ m.W_out_final.T / s_post[:, None]
    else:
        wu = u @ m.W_out_final.T
    return (post * wu / s[:, None]).numpy()


def neuron_rows(d: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For ΔDE [N, d_mlp]: each token's neurons by rank (largest first, ties to the lower index) and
    the 1-based ranks kept (top k and bottom k; all when d_mlp <= 2k). Returns (order [N, d_mlp], ranks)."""
    order = np.argsort(-d, axis=1, kind="stable")
    n = d.shape[1]
    ranks = np.arange(1, n + 1) if n <= 2 * k else np.concatenate([np.arange(1, k + 1), np.arange(n - k + 1, n + 1)])
    return order, ranks


def top_tokens(values: np.ndarray, keep: int) -> np.ndarray:
    """The `keep` token indices with the largest values (ties to the lower index), sorted."""
    return np.sort(np.lexsort((np.arange(len(values)), -values))[:keep])


def _dot(vec: torch.Tensor, u: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (vec * u).sum(-1) / s


@torch.no_grad()
def clean(model, rows: torch.Tensor, family: str | None = None) -> Clean:
    m = model if isinstance(model, Model) else Model(model, family)
    r = run(m, rows)
    zr = run(m, rows[:1, :2], zero_layer_inputs=True)
    c = [zr.z[l][0, 0].double() for l in range(m.n_layers)]
    y = rows[:, 1:].reshape(-1)
    x = _pred(r.x)
    s = _scale(x, m.spec.norm, m.norm_eps)
    u = m.u(y)
    b_eff = m.b_eff[y]
    logit = _dot(x, u, s) + b_eff
    lm = r.lm.double() * m.logit_scale
    lm = lm - lm.mean(-1, keepdim=True)
    hf_logit = _pred(lm).gather(-1, y[:, None])[:, 0]
    de_heads, de_bias = [], []
    for l in range(m.n_layers):
        vec, bias = _head_vecs(m, r, c, l)
        de_heads.append(_dot(vec, u[None], s[None]))
        de_bias.append(_dot(bias, u, s))
    de_heads = torch.stack(de_heads)
    de_bias = torch.stack(de_bias)
    de_mlps = torch.stack([_dot(_pred(r.mlp[l]), u, s) for l in range(m.n_layers)])
    de_other = _dot(_pred(r.h0), u, s) + de_bias.sum(0)
    out = Clean(rows, r, c, y, u, s.numpy(), logit.numpy(), b_eff.numpy(), hf_logit.numpy(),
                de_heads.numpy(), de_mlps.numpy(), de_bias.numpy(), de_other.numpy())
    out.extra["model"] = m
    out.extra["s_t"] = s
    out.extra["output"] = distribution(r.logits, y)  # the clean loss and entropy
    if m.W_out_final is not None:  # no single final-MLP neuron layer in a mixture of experts
        out.extra["neuron_de"] = neuron_des(m, r, u, s)
    return out


@dataclass
class Ablation:
    d_logit: np.ndarray
    ln_scale: np.ndarray  # ablated final-norm scale
    de: np.ndarray  # the ablated head's DE on the ablated run (clean scale)
    d_de_heads: np.ndarray  # Σ over every other head of ΔDE
    d_de_mlps: np.ndarray  # Σ over MLP layers of ΔDE
    d_de_bias: np.ndarray  # Σ over layers of Δ(bias write DE); nonzero only with v/o biases in post-norm blocks
    logit_abl: np.ndarray
    neuron_de: np.ndarray | None = None  # [N, d_mlp] each final-MLP neuron's DE on the ablated run (clean scale)
    metrics: dict = field(default_factory=dict)  # d_loss, kl, d_entropy, top1_changed [N] (`output_metrics`)


def distribution(logits: torch.Tensor, y: torch.Tensor) -> dict:
    """Loss of the correct tokens, entropy, log-probabilities and top-1 of final logits [row, seq, vocab]
    at the prediction positions (float64, natural log)."""
    logp = torch.log_softmax(_pred(logits), -1)
    return {"logp": logp, "loss": (-logp.gather(-1, y[:, None])[:, 0]).numpy(),
            "entropy": (-(logp.exp() * logp).sum(-1)).numpy(), "top1": logp.argmax(-1).numpy(),
            "gap": (lambda t: (t[:, 0] - t[:, 1]).numpy())(logp.topk(2, -1).values)}


def output_metrics(clean: dict, ablated: dict) -> dict:
    """DESIGN.md's output metrics of an ablation from two `distribution`s: d_loss, kl = KL(clean ‖ ablated),
    d_entropy, top1_changed (and `near_tie`: where either run's top two log-probabilities are within 1e-5)."""
    lp, lq = clean["logp"], ablated["logp"]
    return {"d_loss": ablated["loss"] - clean["loss"], "kl": (lp.exp() * (lp - lq)).sum(-1).numpy(),
            "d_entropy": ablated["entropy"] - clean["entropy"], "top1_changed": ablated["top1"] != clean["top1"],
            "near_tie": (clean["gap"] < 1e-5) | (ablated["gap"] < 1e-5)}


def replacement_z(cl: Clean, kind: str, layer: int, head: int, source_rows=None, batch_size=None) -> torch.Tensor:
    """The head's new HF z [row, seq, d_head] for an ablation kind ('clean' patches its own z)."""
    z = cl.run.z[layer][:, :, head]
    R, S, dh = z.shape
    if kind == "clean":
        return z.clone()
    if kind == "resample":
        return z[torch.tensor(np.array(source_rows), dtype=torch.long)].clone()
    if kind == "mean":
        parts = []
        for b0 in range(0, R, batch_size):
            blk = z[b0:b0 + batch_size]
            parts.append(blk.double().mean((0, 1)).float().expand(blk.shape[0], S, dh))
        return torch.cat(parts)
    if kind == "zero":
        return cl.c[layer][head].float().expand(R, S, dh).clone()
    raise ValueError(kind)


@torch.no_grad()
def ablate(cl: Clean, kind: str, layer: int, head: int, source_rows=None, batch_size=None) -> Ablation:
    m: Model = cl.extra["model"]
    z_new = replacement_z(cl, kind, layer, head, source_rows, batch_size)
    r = run(m, cl.rows, patch=(layer, head, z_new))
    s, u = cl.extra["s_t"], cl.u
    x = _pred(r.x)
    s_abl = _scale(x, m.spec.norm, m.norm_eps)
    logit_abl = _dot(x, u, s_abl) + torch.from_numpy(cl.b_eff)
    d_heads = torch.zeros_like(s)
    d_bias = torch.zeros_like(s)
    de = None
    for l in range(m.n_layers):
        vec, bias = _head_vecs(m, r, cl.c, l)
        de_l = _dot(vec, u[None], s[None]) - torch.from_numpy(cl.de_heads[l])
        if l == layer:
            de = _dot(vec[head], u, s)
            de_l[head] = 0
        d_heads += de_l.sum(0)
        d_bias += _dot(bias, u, s) - torch.from_numpy(cl.de_bias[l])
    d_mlps = sum(_dot(_pred(r.mlp[l]), u, s) - torch.from_numpy(cl.de_mlps[l]) for l in range(m.n_layers))
    return Ablation((logit_abl - torch.from_numpy(cl.logit)).numpy(), s_abl.numpy(), de.numpy(),
                    d_heads.numpy(), d_mlps.numpy(), d_bias.numpy(), logit_abl.numpy(),
                    neuron_des(m, r, u, s) if m.W_out_final is not None else None,
                    output_metrics(cl.extra["output"], distribution(r.logits, cl.y)))


def identity_errors(cl: Clean, ab: Ablation, layer: int, head: int, with_bias: bool = False) -> tuple[float, float]:
    """Largest errors of the DE identity (clean) and of the sr_ln closed form (this ablation).

    The closed form is checked as DESIGN.md writes it (sr_ln = sr − d_de_heads − d_de_mlps);
    `with_bias` also subtracts d_de_bias (v/o biases seen through a post-norm)."""
    de_sum = cl.de_heads.sum((0, 1)) + cl.de_mlps.sum(0) + cl.de_other
    e1 = np.abs(de_sum - (cl.logit - cl.b_eff)).max()
    sr = ab.d_logit - (ab.de - cl.de_heads[layer, head])
    sr_ln = sr - ab.d_de_heads - ab.d_de_mlps
    closed = (cl.s / ab.ln_scale - 1) * (ab.logit_abl - cl.b_eff) * ab.ln_scale / cl.s
    e2 = np.abs(sr_ln - (ab.d_de_bias if with_bias else 0) - closed).max()
    return float(e1), float(e2)
