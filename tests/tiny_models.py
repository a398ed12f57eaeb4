"""Tiny randomly initialised models of each family, built offline from transformers configs.

GPT-2 (sequential, LayerNorm, learned positions), GPT-NeoX/Pythia (parallel attention
and MLP, partial rotary) and Llama (RMSNorm, GQA, gated MLP), with perturbed biases and
norm gains, each saved with a byte-level tokenizer so `--model <folder>` works exactly
like a downloaded model. `tiny_families.py` builds all 22 supported families.
"""

from __future__ import annotations

from pathlib import Path

import torch

from selfrepair.ingest.synthetic import byte_tokenizer

FAMILIES = ("gpt2", "neox", "llama")
ABLATIONS = ("resample", "mean", "zero")
# A small store of one tiny GPT-2 (two rows, zero ablation of layer 1): the hostile-store tests damage copies of it.
SMALL_STORE = dict(tokens=62, seq_len=32, batch_size=2, ablations=("zero",), heads="L1", top_p=0.05, neurons_top_k=2)


def build(family: str, n_layers: int = 2, seed: int = 0):
    """A tiny random model of `family` (vocab 257, d_model 32, 4 heads, context 64)."""
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM,
                              LlamaConfig, LlamaForCausalLM)

    torch.manual_seed(seed)
    v, d, h, ctx = 257, 32, 4, 64
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=v, n_embd=d, n_layer=n_layers, n_head=h, n_positions=ctx,
                                           bos_token_id=256, eos_token_id=256))
    elif family == "neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=v, hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=h,
            intermediate_size=4 * d, max_position_embeddings=ctx, rotary_pct=0.25,
            use_parallel_residual=True, bos_token_id=256, eos_token_id=256))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=v, hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=h,
            num_key_value_heads=2, intermediate_size=2 * d, max_position_embeddings=ctx, attention_bias=True, mlp_bias=True,
            bos_token_id=256, eos_token_id=256))
    else:
        raise ValueError(family)
    from tiny_families import perturb

    # Non-zero biases and non-unit gains (folding bugs show); weights scaled so ablations move logits visibly.
    with torch.no_grad():
        perturb(model, family)
    return model.eval()


def save(family: str, folder: Path, n_layers: int = 2) -> Path:
    """Save a tiny model and its tokenizer into `folder` and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    build(family, n_layers).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def rows_from_store(store, model: str, n_rows: int, seq_len: int):
    """The token rows [row, seq_len] of an ingested model, rebuilt from its `tokens` table."""
    import numpy as np

    toks = store.sql(
        "SELECT row, pos, token_id, next_token_id FROM tokens WHERE model = $m ORDER BY row, pos", {"m": model}
    )
    ids = toks["token_id"].to_numpy().reshape(n_rows, seq_len - 1)
    last = toks["next_token_id"].to_numpy().reshape(n_rows, seq_len - 1)[:, -1:]
    return torch.from_numpy(np.concatenate([ids, last], 1).astype(np.int64))


def ingest_tiny(model_dir: Path, store: Path, **overrides):
    """Ingest a tiny model quietly with small test settings (any IngestConfig field overrides)."""
    from selfrepair.ingest.config import IngestConfig
    from selfrepair.ingest.runner import Ingest

    settings = dict(model=str(model_dir), store=store, tokens=310, seq_len=32, batch_size=4,
                    ablations=ABLATIONS, top_p=0.05, neurons_top_k=5, corpus="embedded", quiet=True)
    settings.update(overrides)
    return Ingest(IngestConfig(**settings)).run()


def read_manifest_json(folder: Path) -> dict:
    """A model folder's manifest.json as raw JSON (to damage it; readers parse it with store/manifest.py)."""
    import json

    return json.loads((folder / "manifest.json").read_text())


def small_store_ingest(model_dir: Path) -> list[str]:
    """`selfrepair ingest` arguments for SMALL_STORE's configuration of `model_dir` (the same run from the CLI)."""
    return ["ingest", "--model", str(model_dir), "--tokens", "62", "--seq-len", "32", "--batch-size", "2",
            "--ablations", "zero", "--heads", "L1", "--top-p", "0.05", "--neurons-top-k", "2",
            "--corpus", "embedded", "--quiet"]


def tree_hashes(root: Path, ignore: tuple[str, ...] = ()) -> dict[str, str]:
    """Every file under `root` by its sha256 (symlinks by their target and FIFOs by kind, never opened;
    names in `ignore` left out): a tree is unchanged when this is equal."""
    import os

    out = {}
    for p in sorted(root.rglob("*")):
        if p.name in ignore:
            continue
        if p.is_symlink():
            out[str(p.relative_to(root))] = "-> " + os.readlink(p)
        elif p.is_fifo():
            out[str(p.relative_to(root))] = "fifo"
        elif p.is_file():
            out[str(p.relative_to(root))] = _content_hash(p)
    return out


def _content_hash(path: Path) -> str:
    """sha256 of a file's size, its data extents and their bytes, its holes never read: the hostile-store
    tests' files of hundreds of sparse megabytes cost nothing. Any change of content changes it (a write
    into a hole makes a data extent there); where the filesystem reports no holes, the one extent is the
    whole file."""
    import hashlib
    import os

    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(f"size {size}\n".encode())
        pos = 0
        while pos < size:
            try:
                start = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole from `pos` to the end
                break
            end = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            h.update(f"data {start} {end}\n".encode())
            f.seek(start)
            left = end - start
            while left > 0 and (chunk := f.read(min(left, 1 << 24))):
                h.update(chunk)
                left -= len(chunk)
            pos = end
    return h.hexdigest()
