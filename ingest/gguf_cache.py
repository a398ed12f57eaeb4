"""A float32 copy of a de-quantised GGUF model, so it is de-quantised once per machine, not per load.

transformers de-quantises the embedded model's Q4_1 GGUF file on every load: about 35 s on a
quiet 2-core machine, over 60 s on a busy one. The de-quantised weights are exact float32
values, so saving them once (safetensors, with the config and tokenizer transformers built
from the GGUF metadata) and loading that folder later gives the same tensors bit for bit in
under a second. The copy lives in `$SELFREPAIR_CACHE_DIR` (default `~/.cache/selfrepair`),
keyed by the GGUF file's path, size and modification time and the transformers version; a
folder that cannot be written is no error: the load then reads the GGUF file as before.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

CACHE_ENV = "SELFREPAIR_CACHE_DIR"
_DONE = "complete"  # written last: a folder without it is a copy some process did not finish


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "selfrepair")


def cache_dir(gguf: Path) -> Path:
    """Where the de-quantised copy of `gguf` lives (it changes when the file or transformers does)."""
    import transformers

    st = gguf.stat()
    key = f"{gguf.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{transformers.__version__}"
    return cache_root() / "gguf" / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def cached(gguf: Path) -> Path | None:
    """The finished copy's folder, or None."""
    folder = cache_dir(gguf)
    return folder if (folder / _DONE).exists() else None


def save(model, tokenizer, gguf: Path) -> Path | None:
    """Save a model just de-quantised from `gguf` as its cached copy; None when the cache cannot be written.

    Written to a temporary folder and renamed into place, so a reader never sees half a copy and
    two processes saving at once leave one whole copy.
    """
    folder = cache_dir(gguf)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder.parent))
    except OSError:
        return None
    try:
        # transformers refuses to serialise a model it loaded through its GGUF quantizer; the weights
        # are plain float32 tensors by now, so saving them without the quantizer's marks is exact.
        quantizer = getattr(model, "hf_quantizer", None)
        quant = model.config.__dict__.pop("quantization_config", None)
        model.hf_quantizer = None
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            model.hf_quantizer = quantizer
            if quant is not None:
                model.config.quantization_config = quant
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE).write_text(str(gguf) + "\n")
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first: its copy is the same
            pass
    except OSError:
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cached(gguf)
