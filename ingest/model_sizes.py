"""A model's layer and head counts from its config alone, before any weight loads.

Unit labels are checked against the model before the expensive load (`MLP99` on a 30-layer
model is refused at once). Hugging Face folders and cached hub models give their
`config.json`; the embedded GGUF file gives its metadata, read here key by key without
the `gguf` package (which parses every tensor first). The config's architecture (e.g.
`MixtralForCausalLM`) likewise lets a unit kind the family does not define be refused before the load.
"""

from __future__ import annotations

import struct
from pathlib import Path

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads")


def _hf_config(spec, revision: str | None):
    """The Hugging Face config of a resolved model, or None when none can be read offline (or it is GGUF)."""
    if spec.gguf_file:
        return None
    from transformers import AutoConfig

    kwargs = {"revision": revision} if revision and spec.path is None else {}
    try:
        return AutoConfig.from_pretrained(str(spec.path or spec.hf_id), local_files_only=True, **kwargs)
    except Exception:  # noqa: BLE001 - not cached, not a model folder: the load says why
        return None


def pre_load_facts(spec, revision: str | None = None) -> tuple[tuple[int, int] | None, str | None]:
    """(`model_sizes`, `model_architecture`) of a resolved model from one read of its config."""
    if spec.gguf_file:
        return gguf_sizes(Path(spec.path) / spec.gguf_file), None
    cfg = _hf_config(spec, revision)
    return _config_sizes(cfg), _config_architecture(cfg)


def model_architecture(spec, revision: str | None = None) -> str | None:
    """The causal-LM class a resolved model's config names (`architectures[0]`, e.g. "MixtralForCausalLM"),
    or None when no config can be read offline (GGUF files name no Hugging Face class)."""
    return pre_load_facts(spec, revision)[1]


def model_sizes(spec, revision: str | None = None) -> tuple[int, int] | None:
    """(n_layers, n_heads) of a resolved model (`ingest/models.resolve`), or None when no config can be read offline."""
    return pre_load_facts(spec, revision)[0]


def _config_architecture(cfg) -> str | None:
    archs = getattr(cfg, "architectures", None) if cfg is not None else None
    return archs[0] if archs and isinstance(archs[0], str) else None


def _config_sizes(cfg) -> tuple[int, int] | None:
    if cfg is None:
        return None
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    layers = next((getattr(text, k) for k in _LAYER_KEYS if isinstance(getattr(text, k, None), int)), None)
    heads = next((getattr(text, k) for k in _HEAD_KEYS if isinstance(getattr(text, k, None), int)), None)
    return (layers, heads) if layers and heads else None


def gguf_sizes(path: Path) -> tuple[int, int] | None:
    """`<arch>.block_count` and `<arch>.attention.head_count` from a GGUF file's metadata, or None."""
    try:
        meta = _gguf_metadata(path, stop=lambda m: _sizes_of(m) is not None)
    except (OSError, struct.error, UnicodeDecodeError, ValueError):
        return None
    return _sizes_of(meta)


def _sizes_of(meta: dict) -> tuple[int, int] | None:
    arch = meta.get("general.architecture")
    layers, heads = meta.get(f"{arch}.block_count"), meta.get(f"{arch}.attention.head_count")
    return (int(layers), int(heads)) if isinstance(layers, int) and isinstance(heads, int) else None


def _gguf_metadata(path: Path, stop) -> dict:
    """The scalar and string metadata of a GGUF (v2/v3) file, read until `stop(meta)` holds."""
    meta: dict = {}
    with open(path, "rb") as f:
        magic, version = f.read(4), struct.unpack("<I", f.read(4))[0]
        if magic != b"GGUF" or version < 2:
            raise ValueError("not a GGUF v2+ file")
        _tensors, n_kv = struct.unpack("<QQ", f.read(16))
        for _ in range(n_kv):
            key = _string(f)
            meta[key] = _value(f, struct.unpack("<I", f.read(4))[0])
            if stop(meta):
                break
    return meta


def _string(f) -> str:
    (n,) = struct.unpack("<Q", f.read(8))
    return f.read(n).decode("utf-8")


def _value(f, kind: int):
    """One metadata value; arrays are skipped (None): no size is an array."""
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        item, n = struct.unpack("<IQ", f.read(12))
        for _ in range(n):
            _value(f, item)
        return None
    fmt = "<" + _SCALARS[kind]
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
