"""What every benchmark shares: thread setup, best-of timing, and the model under test.

Benchmarks run on a noisy shared machine, so every figure is a ratio of two timings
taken in the same run, each the best (minimum) of a few repeats: the minimum is the
timing least disturbed by other processes.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from selfrepair.ingest.synthetic import byte_tokenizer

EMBEDDED = "smollm2-135m"


def threads() -> int:
    """Torch threads used by every CPU benchmark: one per core."""
    return os.cpu_count() or 1


def best(fn, repeats: int = 3) -> float:
    """Minimum wall time of `repeats` calls of `fn()`, in seconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def tiny_llama_dir(folder: Path) -> Path:
    """Save a random 4-layer Llama (RMSNorm, GQA, gated MLP) for `--quick` runs."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=257, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=64, bos_token_id=256, eos_token_id=256))
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@dataclass
class Context:
    """Run-wide settings and lazily built shared objects (the model loads once per run).

    Args:
        quick: tiny sizes for a smoke test (a random 4-layer Llama instead of SmolLM2).
        log: progress printer.
    """

    quick: bool = False
    log: object = print
    memo: dict = field(default_factory=dict)
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="selfrepair-bench-")))

    @property
    def model_name(self) -> str:
        return "tiny-llama (random)" if self.quick else EMBEDDED

    @property
    def seq_len(self) -> int:
        return 32 if self.quick else 128

    def model(self):
        """The LoadedModel under test, loaded once on the CPU in float32."""
        if "model" not in self.memo:
            from selfrepair.ingest.models import load_model

            name = str(tiny_llama_dir(self.tmp / "tiny-llama")) if self.quick else EMBEDDED
            t0 = time.perf_counter()
            self.memo["model"] = load_model(name, "cpu")
            self.log(f"  loaded {self.model_name} in {time.perf_counter() - t0:.1f} s")
        return self.memo["model"]

    def weights(self):
        if "weights" not in self.memo:
            from selfrepair.ingest.weights import read_weights

            self.memo["weights"] = read_weights(self.model().hf_model, self.seq_len)
        return self.memo["weights"]

    def rows(self, n_rows: int):
        """`n_rows` rows of the embedded corpus as a LongTensor [batch, pos]."""
        import torch

        from selfrepair.ingest.corpus import build_rows

        m = self.model()
        return torch.from_numpy(build_rows("embedded", m.tokenizer, n_rows, self.seq_len, m.bos_id, m.eos_id))
