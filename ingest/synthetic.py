"""A byte-level tokenizer for randomly initialised models (tests, benchmarks of published shapes).

Real checkpoints bring their own tokenizer; a random model built from a transformers
config has none, and the hub is not always reachable, so this one is built offline.
"""

from __future__ import annotations


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus <|endoftext|> (id 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
