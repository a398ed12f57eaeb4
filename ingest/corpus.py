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

EMBEDDED = "embedded"
PAPER_CORPUS = "NeelNanda/pile-10k"
_SUFFIXES = (".txt", ".jsonl", ".parquet")


def default_corpus(model_name: str, model_is_local: bool) -> str:
    """The embedded corpus for the embedded or a local model, the paper's corpus otherwise."""
    from selfrepair.ingest.models import EMBEDDED as EMBEDDED_MODEL

    return EMBEDDED if model_name == EMBEDDED_MODEL or model_is_local else PAPER_CORPUS


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
    from selfrepair.ingest.models import _hub_reachable

    with _quiet_hub(offline=not _hub_reachable()):
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
