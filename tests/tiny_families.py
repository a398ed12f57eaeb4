"""Tiny random models of all 22 supported Hugging Face families, built offline from configs.

Every model: float32, eval mode, 3 layers by default, d_model 64, 4 query heads (2 key/value
heads where the family has GQA), vocab 257 (byte tokenizer: bos/eos 256, pad 0), context 64.
Every bias the family offers as a config option is switched on, q/k norms are switched on
where the family has them, and after init every bias and every norm gain gets N(0, 0.3²)
added (Hugging Face initialises biases to 0 and gains to 1, which would hide folding bugs).
Weight matrices and embeddings are multiplied by 3 so that ablations move the logits visibly.

Family quirks that are deliberately exercised:
- mistral: sliding window 8 (< the 32-token test rows).
- gemma: embedding scaled by sqrt(d_model), RMSNorm gain 1 + weight.
- gemma2: post-norms, attention softcap 10 and final-logit softcap 5, alternating sliding
  (window 8) / global layers, query_pre_attn_scalar 24 (!= head_dim).
- gemma3 (text-only Gemma3ForCausalLM): post-norms, q/k norms, layer_types alternating
  sliding (window 8) / global, query_pre_attn_scalar 24.
- gptneo: alternating local (window 8) / global attention, no 1/sqrt(d_head) scaling.
- bloom: ALiBi, embedding LayerNorm, fused qkv.
- falcon: new decoder architecture (parallel attention/MLP, two input norms, GQA 2).
- cohere: parallel block, bias-free LayerNorm, per-head q/k norm, logit_scale 0.5.
- post-norm families (gemma2, gemma3, olmo2): attention_bias is on (q/k biases perturbed),
  but the value and output biases are zeroed. A v/o bias passes through the block's
  post-norm, whose scale changes under ablation, and belongs to neither a head nor an MLP:
  with it the DESIGN closed form for sr_ln cannot hold (tests/recompute.py reports the
  missing term as `d_de_bias`). `build(..., post_norm_vo_bias=True)` keeps them.
"""

from __future__ import annotations

from pathlib import Path

import torch

V, D, H, KV, CTX, FF = 257, 64, 4, 2, 64, 128
BOS = EOS = 256
PAD = 0
WINDOW = 8
SCALE = 8.0  # weight multiplier
POST_NORM = ("gemma2", "gemma3", "olmo2")

FAMILIES = ("gpt2", "neox", "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3",
            "phi", "phi3", "opt", "gptj", "gptneo", "olmo", "olmo2", "stablelm", "falcon", "bloom",
            "gptbigcode", "cohere")


def _alternating(n_layers: int) -> list[str]:
    """sliding, full, sliding, ... (at least one global layer when n_layers >= 2)."""
    return ["full_attention" if i % 2 else "sliding_attention" for i in range(n_layers)]


def _make(family: str, n_layers: int):
    import transformers as T

    ids = dict(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    common = dict(vocab_size=V, hidden_size=D, num_hidden_layers=n_layers, num_attention_heads=H,
                  intermediate_size=FF, max_position_embeddings=CTX, **ids)
    gqa = dict(common, num_key_value_heads=KV)
    if family == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=D, n_layer=n_layers, n_head=H, n_positions=CTX,
                                              n_inner=FF, **ids))
    if family == "neox":
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
            **common, use_parallel_residual=True, attention_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}))
    if family == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**gqa, attention_bias=True, mlp_bias=True))
    if family == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**gqa, sliding_window=WINDOW))
    if family == "mixtral":
        return T.MixtralForCausalLM(T.MixtralConfig(**dict(gqa, intermediate_size=D), num_local_experts=4,
                                                    num_experts_per_tok=2))
    if family == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**gqa))
    if family == "qwen3":
        return T.Qwen3ForCausalLM(T.Qwen3Config(**gqa, head_dim=D // H, attention_bias=True))
    if family == "gemma":
        return T.GemmaForCausalLM(T.GemmaConfig(**gqa, head_dim=D // H, attention_bias=True))
    if family == "gemma2":
        return T.Gemma2ForCausalLM(T.Gemma2Config(
            **gqa, head_dim=D // H, attention_bias=True, query_pre_attn_scalar=24, sliding_window=WINDOW,
            layer_types=_alternating(n_layers), final_logit_softcapping=5.0, attn_logit_softcapping=10.0))
    if family == "gemma3":
        return T.Gemma3ForCausalLM(T.Gemma3TextConfig(
            **gqa, head_dim=D // H, attention_bias=True, query_pre_attn_scalar=24, sliding_window=WINDOW,
            layer_types=_alternating(n_layers)))
    if family == "phi":
        return T.PhiForCausalLM(T.PhiConfig(**common, qk_layernorm=True))
    if family == "phi3":
        return T.Phi3ForCausalLM(T.Phi3Config(**gqa))
    if family == "opt":
        return T.OPTForCausalLM(T.OPTConfig(
            vocab_size=V, hidden_size=D, num_hidden_layers=n_layers, num_attention_heads=H, ffn_dim=FF,
            max_position_embeddings=CTX, word_embed_proj_dim=D, do_layer_norm_before=True, enable_bias=True,
            layer_norm_elementwise_affine=True, **ids))
    if family == "gptj":
        return T.GPTJForCausalLM(T.GPTJConfig(vocab_size=V, n_embd=D, n_layer=n_layers, n_head=H, n_positions=CTX,
                                              n_inner=FF, rotary_dim=8, **ids))
    if family == "gptneo":
        types = ["local" if t == "sliding_attention" else "global" for t in _alternating(n_layers)]
        return T.GPTNeoForCausalLM(T.GPTNeoConfig(
            vocab_size=V, hidden_size=D, num_layers=n_layers, num_heads=H, intermediate_size=FF,
            max_position_embeddings=CTX, attention_types=[[types, 1]], window_size=WINDOW, **ids))
    if family == "olmo":
        return T.OlmoForCausalLM(T.OlmoConfig(**gqa, attention_bias=True))
    if family == "olmo2":
        return T.Olmo2ForCausalLM(T.Olmo2Config(**gqa, attention_bias=True))
    if family == "stablelm":
        return T.StableLmForCausalLM(T.StableLmConfig(**gqa, use_qkv_bias=True, qk_layernorm=True))
    if family == "falcon":
        return T.FalconForCausalLM(T.FalconConfig(
            vocab_size=V, hidden_size=D, num_hidden_layers=n_layers, num_attention_heads=H, num_kv_heads=KV,
            new_decoder_architecture=True, parallel_attn=True, bias=True, alibi=False, ffn_hidden_size=FF,
            max_position_embeddings=CTX, **ids))
    if family == "bloom":
        return T.BloomForCausalLM(T.BloomConfig(vocab_size=V, hidden_size=D, n_layer=n_layers, n_head=H, **ids))
    if family == "gptbigcode":
        return T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(vocab_size=V, n_embd=D, n_layer=n_layers, n_head=H,
                                                          n_positions=CTX, n_inner=FF, multi_query=True, **ids))
    if family == "cohere":
        return T.CohereForCausalLM(T.CohereConfig(**gqa, attention_bias=True, use_qk_norm=True, logit_scale=0.5))
    raise ValueError(f"unknown family {family!r}")


def _is_norm(module: torch.nn.Module) -> bool:
    name = type(module).__name__
    return "Norm" in name or "LayerNorm" in name


@torch.no_grad()
def perturb(model: torch.nn.Module, family: str, post_norm_vo_bias: bool = False, scale: float | None = None) -> None:
    """Biases and norm gains + N(0, 0.3²) (HF inits them to 0 and 1, which hides folding bugs); weights × scale."""
    scale = SCALE if scale is None else scale
    gen = torch.Generator().manual_seed(1234)
    norm_params = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in norm_params or name.endswith("bias"):
            p.add_(0.3 * torch.randn(p.shape, generator=gen))  # gains and biases: N(0, 0.3²) on top of init
        else:
            p.mul_(scale)  # weights and embeddings: bigger logits, visible ablation effects
    if family in POST_NORM and not post_norm_vo_bias:
        for layer in model.model.layers:
            for proj in (layer.self_attn.v_proj, layer.self_attn.o_proj):
                if proj.bias is not None:
                    proj.bias.zero_()


def build(family: str, n_layers: int = 3, seed: int = 0, post_norm_vo_bias: bool = False):
    """A tiny random float32 eval model of `family` (see the module docstring)."""
    torch.manual_seed(seed)
    model = _make(family, n_layers)
    perturb(model, family, post_norm_vo_bias)
    return model.float().eval()


def save(family: str, folder: Path, n_layers: int = 3, seed: int = 0) -> Path:
    """Save a tiny model of `family` and the byte tokenizer into `folder` and return it."""
    from selfrepair.ingest.synthetic import byte_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build(family, n_layers, seed).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder
