"""Corpora and tokenisation (DESIGN.md: documents joined with EOS, rows of BOS + seq_len-1 tokens).

Specs: `embedded` (the Python standard library's reference text, `pydoc_data.topics`),
a local `.txt` / `.jsonl` / `.parquet` file or a folder of them, or a Hugging Face
dataset name (`NeelNanda/pile-10k`, optionally `hf:` prefixed). No shuffling.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from selfrepair.errors import CorpusError
from selfrepair.ingest import models

EMBEDDED = "embedded"
PAPER_CORPUS = "NeelNanda/pile-10k"
_SUFFIXES = (".txt", ".jsonl", ".parquet")


def default_corpus(model_name: str, model_is_local: bool) -> str:
    """The embedded corpus for the embedded or a local model, the paper's corpus otherwise."""
    return EMBEDDED if model_name == models.EMBEDDED or model_is_local else PAPER_CORPUS


def _embedded_documents() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def _file_documents(path: Path) -> Iterator[str]:
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8", errors="replace")
    elif path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise CorpusError(f"corpus {path}: line {n} is not valid UTF-8 (byte 0x{raw[e.start]:02X} "
                                      f"at column {e.start + 1})") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise CorpusError(f"corpus {path}: line {n} is not JSON") from None
                text = record.get("text") if isinstance(record, dict) else record
                if not isinstance(text, str):
                    raise CorpusError(f"corpus {path}: line {n} has no string 'text' field")
                yield text
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            reason = str(e).splitlines()[0].split(". ")[0]
            raise CorpusError(f"corpus {path}: not a readable Parquet file ({reason})") from None
        if "text" not in table.column_names:
            raise CorpusError(f"corpus {path}: no 'text' column (has {', '.join(table.column_names)})")
        column = table.column("text")
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise CorpusError(f"corpus {path}: the 'text' column holds {column.type}, not strings")
        yield from (t for t in column.to_pylist() if t)


def _hf_documents(name: str) -> Iterator[str]:
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise CorpusError(
            f"corpus {name}: the Hugging Face `datasets` package is not installed and no local file "
            "has that name; pass a local .txt/.jsonl/.parquet file or --corpus embedded"
        ) from None
    with _quiet_hub(offline=not models._hub_reachable()):
        try:
            ds = datasets.load_dataset(name, split="train")
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds; one line is what a user needs
            raise CorpusError(
                f"corpus {name}: cannot load the dataset ({str(e).splitlines()[0][:120]}); "
                "pass a local .txt/.jsonl/.parquet file or --corpus embedded"
            ) from None
    yield from (t for t in ds["text"] if t)


@contextlib.contextmanager
def _quiet_hub(offline: bool):
    """No hub warnings or retry lines on the terminal (the failure becomes one line), and no network when offline.

    `datasets` and `huggingface_hub` read their offline switches when first imported
    (transformers imported them already), so the switches are set on the modules too.
    """
    import datasets
    import huggingface_hub.constants
    from huggingface_hub.utils import logging as hub_logging

    saved = (datasets.config.HF_HUB_OFFLINE, getattr(datasets.config, "HF_DATASETS_OFFLINE", None),
             huggingface_hub.constants.HF_HUB_OFFLINE, datasets.logging.get_verbosity(), hub_logging.get_verbosity())
    if offline:
        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
        huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.logging.set_verbosity_error()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved[0], saved[1]
        huggingface_hub.constants.HF_HUB_OFFLINE = saved[2]
        datasets.logging.set_verbosity(saved[3])
        hub_logging.set_verbosity(saved[4])


def documents(spec: str) -> Iterator[str]:
    """Yield the corpus's documents in order."""
    if spec == EMBEDDED:
        yield from _embedded_documents()
        return
    name = spec[3:] if spec.startswith("hf:") else spec
    path = Path(name).expanduser()
    if not spec.startswith("hf:") and path.exists():
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in _SUFFIXES and p.is_file())
            if not found:
                raise CorpusError(f"corpus folder {path} holds no .txt, .jsonl or .parquet file")
            for p in found:
                yield from _file_documents(p)
        elif path.suffix in _SUFFIXES:
            yield from _file_documents(path)
        else:
            raise CorpusError(f"corpus {path}: unsupported file type (use .txt, .jsonl or .parquet)")
        return
    if spec.startswith("hf:") or "/" in name and not name.startswith((".", "/", "~")):
        yield from _hf_documents(name)
        return
    raise CorpusError(f"corpus {spec!r} not found: not a local file or folder, not 'embedded', not a dataset id")


def build_rows(spec: str, tokenizer, n_rows: int, seq_len: int, bos_id: int, eos_id: int) -> np.ndarray:
    """Tokenise documents (joined with EOS) into rows of BOS + seq_len - 1 tokens.

    Args:
        spec: corpus spec.
        tokenizer: a Hugging Face tokenizer.
        n_rows: rows wanted.
        seq_len: tokens per row.
        bos_id: token prepended to every row.
        eos_id: separator between documents.

    Returns:
        int64 array [n_rows, seq_len].

    Raises:
        CorpusError: empty corpus, or fewer tokens than the rows need.
    """
    body = seq_len - 1
    need = n_rows * body
    stream: list[int] = []
    n_docs = 0
    for doc in documents(spec):
        if not isinstance(doc, str):
            raise CorpusError(f"corpus {spec}: a document is {type(doc).__name__}, not text")
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        n_docs += 1
        stream.extend(ids)
        stream.append(eos_id)
        if len(stream) >= need:
            break
    if not stream:
        raise CorpusError(f"corpus {spec}: empty (no text to tokenise)")
    if len(stream) < body:
        raise CorpusError(
            f"corpus {spec}: {len(stream)} tokens is shorter than one row ({body} tokens after BOS)"
        )
    if len(stream) < need:
        raise CorpusError(
            f"corpus {spec}: {len(stream)} tokens, fewer than the {need} that {n_rows} rows of "
            f"{seq_len} need; lower --tokens to at most {len(stream) // body * body}"
        )
    rows = np.asarray(stream[:need], dtype=np.int64).reshape(n_rows, body)
    return np.concatenate([np.full((n_rows, 1), bos_id, dtype=np.int64), rows], axis=1)


def fingerprint(rows: np.ndarray) -> str:
    """sha256 of the token stream (int32, row-major): the corpus identity in the manifest."""
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int32).tobytes()).hexdigest()


# TransformerLens's tokenize_and_concatenate as the authors ran it (TransformerLens 1.x): a
# `datasets.map` in batches of 1000 documents over `num_proc=10` contiguous shards.
TL_MAP_BATCH = 1000
TL_NUM_PROC = 10
TL_CHUNKS = 20


def _tl_map_batches(docs: list[str]) -> Iterator[list[str]]:
    """The document batches `datasets.map(batched=True, num_proc=10)` hands to the function, in order."""
    n = len(docs)
    shards = min(TL_NUM_PROC, n)
    start = 0
    for i in range(shards):
        size = n // shards + (1 if i < n % shards else 0)  # datasets' contiguous sharding
        for b in range(start, start + size, TL_MAP_BATCH):
            yield docs[b:min(b + TL_MAP_BATCH, start + size)]
        start += size


def tl_rows(spec: str, tokenizer, n_rows: int, seq_len: int) -> np.ndarray:
    """Rows as TransformerLens's (chunked) `tokenize_and_concatenate(dataset, tokenizer, max_length=seq_len)` built them.

    Per map batch: the texts joined with the EOS *string*, cut into 20 equal character chunks
    (a chunk may split a word or the EOS string itself), each chunk tokenised with the tokenizer's
    own special tokens (a Llama tokenizer starts each chunk with BOS), then every pad token deleted.
    TransformerLens gave its tokenizers pad = EOS, so every EOS goes too: no document separators
    remain. The stream is cut into rows of seq_len - 1 tokens (the remainder of the batch dropped),
    each after a BOS.

    Args:
        spec: corpus spec.
        tokenizer: a Hugging Face tokenizer with an EOS token.
        n_rows: rows wanted (the first n_rows built).
        seq_len: tokens per row, BOS included.

    Returns:
        int64 array [n_rows, seq_len].

    Raises:
        CorpusError: an empty corpus, or fewer rows than asked.
    """
    if tokenizer.eos_token is None:
        raise CorpusError(f"corpus {spec}: the tokenizer has no EOS token to join documents with")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token is not None else eos  # TransformerLens: pad = EOS if unset
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos  # likewise BOS
    body = seq_len - 1
    docs = [d for d in documents(spec)]
    if not docs:
        raise CorpusError(f"corpus {spec}: empty (no text to tokenise)")
    out: list[np.ndarray] = []
    have = 0
    for texts in _tl_map_batches(docs):
        full = tokenizer.eos_token.join(texts)
        size = (len(full) - 1) // TL_CHUNKS + 1
        chunks = [full[i * size:(i + 1) * size] for i in range(TL_CHUNKS)]
        # Padding the chunks to one length and deleting pads afterwards equals not padding at all.
        ids = np.concatenate([np.asarray(tokenizer(c)["input_ids"], dtype=np.int64) for c in chunks])
        ids = ids[ids != pad]
        k = len(ids) // body
        if k:
            rows = ids[:k * body].reshape(k, body)  # [batch, seq_len - 1]
            out.append(np.concatenate([np.full((k, 1), bos, dtype=np.int64), rows], axis=1))
            have += k
        if have >= n_rows:
            break
    if have < n_rows:
        raise CorpusError(f"corpus {spec}: tokenize_and_concatenate makes {have} rows of {seq_len} tokens, fewer "
                          f"than the {n_rows} asked; lower --tokens to at most {have * body}")
    return np.concatenate(out)[:n_rows]
