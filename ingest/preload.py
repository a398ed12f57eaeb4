"""What the plan needs from a model before its weights load: family, shape and context, from its config.

A skeleton of the model is built from its config on PyTorch's `meta` device (no memory, no
weights, no forward pass), and its shape is read from the same modules `read_weights` reads, so
the plan and the disk estimate printed before the load are the ones after it. The config comes
from `config.json` (a local folder or the Hugging Face cache) or, for a GGUF file, from its
metadata read key by key (`model_sizes.py`) and renamed to the Hugging Face config's keys by
transformers' own GGUF table, without the `gguf` package (which parses every tensor first).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from selfrepair.errors import UnsupportedModel
from selfrepair.ingest.families import Family, family_of, module_at
from selfrepair.ingest.model_sizes import _gguf_metadata, _hf_config
from selfrepair.store.estimate import ModelShape
from selfrepair.store.flops import GATES, Arch

# GGUF `general.architecture` values that transformers reads as another model type (its own renames).
_GGUF_MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gemma3": "gemma3_text"}


@dataclass(frozen=True)
class ModelFacts:
    """A model as the plan shows it.

    Args:
        family: the supported family (ingest/families.py).
        shape: the dimensions the store's sizes depend on.
        norm: the final norm's module class (e.g. `LlamaRMSNorm`).
        post_norm: whether blocks normalise their attention and MLP outputs.
        n_ctx: the longest row the model takes (None: its config does not say).
        arch: the shape facts the FLOP model counts with (store/flops.py: key/value heads, gating).
        softcapped: whether the final logits are softcapped (the output metrics then cost more per pass).
    """

    family: Family
    shape: ModelShape
    norm: str
    post_norm: bool
    n_ctx: int | None
    arch: Arch | None = None
    softcapped: bool = False

    @property
    def n_layers(self) -> int:
        return self.shape.n_layers

    @property
    def n_heads(self) -> int:
        return self.shape.n_heads


def facts_of(model, config, n_heads: int, d_model: int) -> ModelFacts:
    """The facts of a model (loaded, or a skeleton on the meta device) and its config."""
    from selfrepair.ingest.models import context_length
    from selfrepair.ingest.weights import in_major, norm_children

    family = family_of(model)
    layers = list(module_at(model, family.layers))
    W_O = in_major(module_at(layers[0], family.attn_out), f"{family.name} {family.attn_out}")  # [H·d_head, d_model]
    d_mlp = 0 if family.moe else in_major(module_at(layers[-1], family.down), family.down).shape[0]
    shape = ModelShape(
        n_layers=len(layers), n_heads=n_heads, d_model=d_model, d_head=W_O.shape[0] // n_heads, d_mlp=d_mlp,
        d_vocab=int(in_major(model.get_output_embeddings(), "unembedding").shape[1]),
        n_norms=sum(len(norm_children(layer)) for layer in layers) + 1, parallel=bool(family.parallel(config)))
    norm = type(module_at(model, family.final_norm)).__name__
    mlp = module_at(layers[0], family.mlp_out)
    arch = Arch(shape.n_layers, n_heads, getattr(config, "num_key_value_heads", None) or n_heads, shape.d_head,
                d_model, d_mlp, any(hasattr(mlp, a) for a in GATES), shape.parallel)
    return ModelFacts(family, shape, norm, bool(family.attn_post), context_length(config), arch,
                      bool(getattr(config, "final_logit_softcapping", None)))


def weights_facts(w) -> ModelFacts:
    """The facts of a loaded model from its engine weights (`ingest/weights.py::Weights`)."""
    from selfrepair.ingest.disk import model_shape
    from selfrepair.ingest.models import context_length

    return ModelFacts(w.family, model_shape(w), type(module_at(w.model, w.family.final_norm)).__name__,
                      w.post_norm, context_length(w.model.config), Arch.of(w), bool(w.softcap))


def gguf_config(path: Path):
    """A Hugging Face config from a GGUF file's metadata, or None when its architecture is not one transformers reads."""
    from transformers import AutoConfig
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    meta = _gguf_metadata(path, stop=lambda m: False)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        return None
    name = str(meta.get("general.name") or "").lower()
    model_type = "mistral" if arch == "llama" and "mistral" in name else _GGUF_MODEL_TYPES.get(arch, arch)
    mapping = GGUF_CONFIG_MAPPING.get(model_type) or GGUF_CONFIG_MAPPING.get(arch)
    if mapping is None:
        return None
    kwargs = {key: meta[f"{arch}.{k}"] for k, key in mapping.items() if key is not None and meta.get(f"{arch}.{k}") is not None}
    return AutoConfig.for_model(model_type, **kwargs)


def pre_load_model_facts(spec, revision: str | None = None) -> ModelFacts | None:
    """The facts of a resolved model (`ingest/models.resolve`) from its config alone, or None when no config
    can be read offline or its skeleton cannot be built (the load then finds out).

    Raises:
        UnsupportedModel: the config names a family selfrepair refuses (as the load would).
    """
    import torch
    from transformers import AutoModelForCausalLM

    try:
        config = gguf_config(Path(spec.path) / spec.gguf_file) if spec.gguf_file else _hf_config(spec, revision)
    except Exception:  # noqa: BLE001 - an unreadable config: the load gives the reason
        return None
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_heads = next((getattr(text, k) for k in ("num_attention_heads", "n_head", "num_heads")
                    if isinstance(getattr(text, k, None), int)), None)
    d_model = next((getattr(text, k) for k in ("hidden_size", "n_embd", "d_model")
                    if isinstance(getattr(text, k, None), int)), None)
    if not n_heads or not d_model:
        return None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - e.g. a remote-code model: the load gives the reason
        return None
    try:
        return facts_of(model, config, n_heads, d_model)
    except UnsupportedModel:
        raise
    except Exception:  # noqa: BLE001 - a layout read_weights would name: the load gives the reason
        return None
