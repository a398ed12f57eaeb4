"""Which Hugging Face architectures the engine drives, and where their pieces live.

The fast engine runs the model's own decoder-layer modules, so every quirk of a family
(q/k norms, sliding windows, ALiBi, embedding scales, softcaps, fused projections) comes
from transformers itself. What it needs to know per family is only where to look: the
decoder layers, the attention output projection (its input is `hook_z`, head-major), the
module whose output is the MLP's write, the MLP's down projection (neurons), post-norms,
the final norm and the unembedding. Anything not listed here is refused by name.

Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) have ordinary attention, so
head, group and attention-layer units are defined; their sparse MLP block's output (the routed
experts' writes, weighted by the router, plus any shared expert) is one write to the residual, so
each layer's MLP DE is defined too. What they lack is one MLP with one set of neurons: `down` is
None, MLP and block units are refused (`MOE_UNDEFINED`), and so is final-MLP neuron detail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from selfrepair.errors import UnsupportedModel


@dataclass(frozen=True)
class Family:
    """Module paths of one architecture (dotted, from the causal-LM root or from a layer).

    Args:
        name: the family's name in messages and the manifest.
        layers: the decoder layers' ModuleList, from the root.
        attn_out: in a layer, the attention output projection; its input is the heads' z.
        mlp_out: in a layer, the module whose output is the MLP's contribution (bias included).
        down: in a layer, the MLP's down projection: its input is the neurons' activations;
            None for a mixture of experts (no single set of final-MLP neurons).
        final_norm: the final norm, from the root.
        attn_post: in a layer, the norm applied to the attention output before the residual add.
        mlp_post: in a layer, likewise for the MLP output.
        parallel: whether attention and MLP read the same residual, from the config.
        check: returns why a configuration is unsupported, or None.
    """

    name: str
    layers: str
    attn_out: str
    mlp_out: str
    down: str | None
    final_norm: str
    attn_post: str | None = None
    mlp_post: str | None = None
    parallel: Callable[[object], bool] = lambda cfg: False
    check: Callable[[object], str | None] = lambda cfg: None

    @property
    def moe(self) -> bool:
        """Whether the MLP is a mixture of experts (no single final-MLP neuron layer)."""
        return self.down is None


def _llama_like(name: str, **kw) -> Family:
    return Family(name, "model.layers", "self_attn.o_proj", "mlp", "mlp.down_proj", "model.norm", **kw)


def _moe(name: str, **kw) -> Family:
    # The sparse block (`mlp`) returns the weighted sum of the routed experts (and a shared expert's
    # gated output): the layer's whole MLP write. There is no one down projection to read neurons from.
    return Family(name, "model.layers", "self_attn.o_proj", "mlp", None, "model.norm", **kw)


def _opt_check(cfg) -> str | None:
    if not getattr(cfg, "do_layer_norm_before", True):
        return "post-LayerNorm OPT variants (do_layer_norm_before=False, e.g. opt-350m) are not supported"
    if getattr(cfg, "_remove_final_layer_norm", False):
        return "OPT saved without its final LayerNorm (_remove_final_layer_norm=True) is not supported"
    if getattr(cfg, "word_embed_proj_dim", cfg.hidden_size) != cfg.hidden_size:
        return "OPT with project_in/project_out (word_embed_proj_dim != hidden_size) is not supported"
    return None


def _bloom_check(cfg) -> str | None:
    if getattr(cfg, "apply_residual_connection_post_layernorm", False):
        return "BLOOM with apply_residual_connection_post_layernorm is not supported"
    return None


_GEMMA2_POST = dict(attn_post="post_attention_layernorm", mlp_post="post_feedforward_layernorm")

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("GPT-2", "transformer.h", "attn.c_proj", "mlp", "mlp.c_proj", "transformer.ln_f"),
    Family("GPT-NeoX", "gpt_neox.layers", "attention.dense", "mlp", "mlp.dense_4h_to_h",
           "gpt_neox.final_layer_norm",
           parallel=lambda c: bool(getattr(c, "use_parallel_residual", True))),
    _llama_like("Llama"),
    _llama_like("Mistral"),
    _llama_like("Qwen2"),
    _llama_like("Qwen3"),
    _llama_like("Gemma"),
    _llama_like("Gemma 2", **_GEMMA2_POST),
    _llama_like("Gemma 3", **_GEMMA2_POST),
    _llama_like("OLMo"),
    _llama_like("OLMo 2", **_GEMMA2_POST),
    _llama_like("Phi-3"),
    _llama_like("StableLM", parallel=lambda c: bool(getattr(c, "use_parallel_residual", False))),
    _llama_like("Cohere", parallel=lambda c: True),
    Family("Phi", "model.layers", "self_attn.dense", "mlp", "mlp.fc2", "model.final_layernorm",
           parallel=lambda c: True),
    Family("OPT", "model.decoder.layers", "self_attn.out_proj", "fc2", "fc2", "model.decoder.final_layer_norm",
           check=_opt_check),
    Family("GPT-J", "transformer.h", "attn.out_proj", "mlp", "mlp.fc_out", "transformer.ln_f",
           parallel=lambda c: True),
    Family("GPT-Neo", "transformer.h", "attn.attention.out_proj", "mlp", "mlp.c_proj", "transformer.ln_f"),
    Family("Falcon", "transformer.h", "self_attention.dense", "mlp", "mlp.dense_4h_to_h", "transformer.ln_f",
           parallel=lambda c: bool(getattr(c, "parallel_attn", True) or getattr(c, "new_decoder_architecture", False))),
    # BLOOM adds the residual inside attention and MLP; the projections' outputs are the writes.
    Family("BLOOM", "transformer.h", "self_attention.dense", "mlp.dense_4h_to_h", "mlp.dense_4h_to_h",
           "transformer.ln_f", check=_bloom_check),
    Family("GPT-BigCode", "transformer.h", "attn.c_proj", "mlp", "mlp.c_proj", "transformer.ln_f"),
    _moe("Mixtral"),
    _moe("Qwen2-MoE"),
    _moe("Qwen3-MoE"),
    _moe("OLMoE"),
)}

# Hugging Face causal-LM class name -> family.
ARCHITECTURES: dict[str, str] = {
    "GPT2LMHeadModel": "GPT-2", "GPTNeoXForCausalLM": "GPT-NeoX", "LlamaForCausalLM": "Llama",
    "MistralForCausalLM": "Mistral", "Qwen2ForCausalLM": "Qwen2", "Qwen3ForCausalLM": "Qwen3",
    "GemmaForCausalLM": "Gemma", "Gemma2ForCausalLM": "Gemma 2", "Gemma3ForCausalLM": "Gemma 3",
    "OlmoForCausalLM": "OLMo", "Olmo2ForCausalLM": "OLMo 2", "Phi3ForCausalLM": "Phi-3",
    "StableLmForCausalLM": "StableLM", "CohereForCausalLM": "Cohere", "PhiForCausalLM": "Phi",
    "OPTForCausalLM": "OPT", "GPTJForCausalLM": "GPT-J", "GPTNeoForCausalLM": "GPT-Neo",
    "FalconForCausalLM": "Falcon", "BloomForCausalLM": "BLOOM", "GPTBigCodeForCausalLM": "GPT-BigCode",
    "MixtralForCausalLM": "Mixtral", "Qwen2MoeForCausalLM": "Qwen2-MoE", "Qwen3MoeForCausalLM": "Qwen3-MoE",
    "OlmoeForCausalLM": "OLMoE",
}

# Unit kinds a mixture-of-experts family does not define, and why (`moe_problem`).
MOE_UNDEFINED = ("mlp", "block")
MOE_WHY = "its MLP is a mixture of experts, not one MLP"
MOE_NEURONS_WHY = "final-MLP neurons are not defined for a mixture-of-experts MLP (each expert has its own)"

# Families refused on purpose, with the reason a user sees.
REFUSED: dict[str, str] = {}


def family_named(name: str) -> Family | None:
    """The family of a family name ("Mixtral") or a Hugging Face architecture ("MixtralForCausalLM"), or None."""
    return FAMILIES.get(name) or FAMILIES.get(ARCHITECTURES.get(name, ""))


def moe_problem(name: str, kind: str) -> str | None:
    """Why units of `kind` are not defined for the family or architecture `name` because its MLP is a
    mixture of experts, or None (any other family, or a kind it defines)."""
    family = family_named(name)
    if family is None or not family.moe or kind not in MOE_UNDEFINED:
        return None
    return f"{family.name}: {MOE_WHY}, so {kind} units are not defined (head, group and attn units are)"


def family_of(hf_model) -> Family:
    """The family of a loaded causal LM, or UnsupportedModel naming what is not supported."""
    arch = type(hf_model).__name__
    if arch in REFUSED:
        raise UnsupportedModel(REFUSED[arch])
    if arch not in ARCHITECTURES:
        known = ", ".join(sorted(FAMILIES))
        raise UnsupportedModel(f"{arch}: this architecture is not supported (supported families: {known})")
    family = FAMILIES[ARCHITECTURES[arch]]
    problem = family.check(hf_model.config)
    if problem:
        raise UnsupportedModel(f"{family.name}: {problem}")
    return family


def module_at(root, path: str):
    """The submodule at a dotted path, or UnsupportedModel when the layout differs."""
    import torch

    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            raise UnsupportedModel(
                f"{type(root).__name__} has no module {path!r}: its layout differs from what selfrepair supports"
            )
        obj = getattr(obj, part)
    if not isinstance(obj, torch.nn.Module):  # e.g. a final norm a config switched off (None): refused by name
        raise UnsupportedModel(f"{type(root).__name__} has no module at {path!r} ({type(obj).__name__} there): "
                               "this configuration of the architecture is not supported")
    return obj


def attention_modules(w) -> list:
    """Each layer's attention module of a read model (`ingest/weights.Weights`): the parent of its output projection."""
    parent = w.family.attn_out.rsplit(".", 1)[0]
    return [module_at(layer, parent) for layer in w.layers]
