"""Zarr v3 arrays of the clean run (token-major) and the weights needed to recompute DEs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import zarr

from selfrepair.errors import StoreError
from selfrepair.store.files import raise_store_error
from selfrepair.store.manifest import Manifest
from selfrepair.store.schema import ARRAYS, WEIGHT_ARRAYS, WEIGHT_DOCS


# A zarr.json holds a shape, a chunk grid, codecs and a few attributes: a few KB. Anything
# bigger is not ours, and is refused before zarr parses it.
MAX_METADATA_BYTES = 1 << 20


def check_tree(path: Path) -> None:
    """Refuse an `activations.zarr` that is not wholly inside its model folder, before zarr opens it.

    The one check behind `verify` and `Store.activations()` (and the ingest's writes): the
    folder itself, every array folder, every chunk folder and every chunk must be a real
    folder or regular file, never a symlink (which would read or write outside the store)
    and never a FIFO or device (which would block a read); every `zarr.json` at most
    MAX_METADATA_BYTES. One lstat per entry, no file is opened.

    Raises:
        StoreError: naming the first offending path.
    """
    if not os.path.lexists(path):
        return
    _check_entry(path, os.lstat(path), folder=True)
    for folder, dirs, names in os.walk(path, followlinks=False):
        for name in dirs + names:
            p = Path(folder) / name
            try:
                st = os.lstat(p)
            except FileNotFoundError:  # a temporary chunk renamed while we walk
                continue
            _check_entry(p, st, folder=name in dirs)


def _check_entry(p: Path, st: os.stat_result, folder: bool) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise StoreError(f"{p} is a symlink; the activations must lie inside the model folder (remove the link)")
    if folder and not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{p} is not a folder")
    if not folder and not stat.S_ISREG(st.st_mode):
        raise StoreError(f"{p} is not a regular file (a FIFO, socket or device); remove it")
    if p.name == "zarr.json" and st.st_size > MAX_METADATA_BYTES:
        raise StoreError(f"{p} is {st.st_size} bytes; Zarr metadata is at most {MAX_METADATA_BYTES} bytes")


def expected_dims(manifest: Manifest, name: str | None = None) -> dict[str, int]:
    """Each dimension's size from the manifest's model facts; token_index: the most tokens the
    manifest accounts for (n_tokens, n_rows × (seq_len − 1), or the array's recorded length: an
    extension that was interrupted and not repeated leaves arrays longer than the tokens stored);
    chunk_tokens: one batch of tokens, the longest chunk along token_index."""
    model = manifest.model
    preds = max(manifest.seq_len - 1, 0)
    recorded = manifest.arrays[name].shape if name in manifest.arrays else (0,)
    n_tokens = max(manifest.n_tokens, manifest.n_rows * preds, _int(recorded[0]) if name in ARRAYS else 0)
    return {"token_index": n_tokens, "chunk_tokens": _int(manifest.config.batch_size) * preds,
            "layer": _int(model.n_layers), "head": _int(model.n_heads),
            "d_head": _int(model.d_head), "d_model": _int(model.d_model),
            "d_mlp": _int(model.d_mlp), "d_vocab": _int(model.d_vocab),
            "norm": len(model.norm_names)}


def _int(v) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def shape_problems(found: dict[str, dict], manifest: Manifest) -> dict[str, str]:
    """Arrays whose shape or chunk grid does not fit the model and the tokens: name -> why.

    Checked before any array is read: a zarr.json claiming 10^15 tokens is refused here
    rather than met as a MemoryError. The token dimension may be at most the tokens the
    manifest accounts for (`expected_dims`); every other dimension must equal the model's;
    chunks no larger than the array (along token_index: or one batch of tokens).
    """
    out = {}
    for name, info in found.items():
        sizes = expected_dims(manifest, name)
        dims = ARRAYS[name].dims if name in ARRAYS else WEIGHT_ARRAYS.get(name.removeprefix("weights/"))
        if dims is None:
            continue  # not ours; nothing reads it
        shape, chunks = list(info["shape"]), list(info.get("chunks") or info["shape"])
        if len(shape) != len(dims):
            out[name] = f"has {len(shape)} dimensions, store/schema.py says {len(dims)} ({', '.join(dims)})"
            continue
        for dim, n, c in zip(dims, shape, chunks):
            limit = sizes[dim]
            if not limit:
                out[name] = f"cannot be checked: the manifest gives no size for {dim}"
                break
            if (n > limit) if dim == "token_index" else (n != limit):
                out[name] = (f"shape {shape}: token_index is {n}, more than the {limit} tokens the manifest "
                             "accounts for" if dim == "token_index" else
                             f"shape {shape}: {dim} is {n}, the model's (manifest) is {limit}")
                break
            # A chunk spans one batch of tokens (maybe more than a short store holds), never more.
            if c > max(n, 1, sizes["chunk_tokens"] if dim == "token_index" else 0):
                out[name] = f"chunk {chunks} is larger than the array {shape} and a batch of tokens"
                break
    return out


def _compressor():
    return zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


def create_arrays(path: Path, shapes: dict[str, tuple[int, ...]], chunk_tokens: int, dtype: str) -> None:
    """Create (or grow) the activation arrays.

    Args:
        path: the `activations.zarr` folder.
        shapes: array name -> full shape, first dim the token count.
        chunk_tokens: chunk length along `token_index` (one clean shard writes whole chunks).
        dtype: "float16" or "float32".
    """
    try:
        _create_arrays(path, shapes, chunk_tokens, dtype)
    except OSError as e:  # a full disk or a read-only mount, as one line
        raise_store_error(path, e)
    except (ValueError, KeyError) as e:  # damaged zarr.json metadata
        raise StoreError(f"{path}: the Zarr metadata is damaged ({type(e).__name__}); run selfrepair verify") from None


def _create_arrays(path: Path, shapes: dict[str, tuple[int, ...]], chunk_tokens: int, dtype: str) -> None:
    group = zarr.open_group(str(path), mode="a")
    for name, shape in shapes.items():
        spec = ARRAYS[name]
        if name in group:
            arr = group[name]
            if arr.shape[1:] != tuple(shape[1:]):
                raise StoreError(f"array {path}/{name} has shape {arr.shape}, expected {shape}")
            if arr.shape[0] < shape[0]:
                arr.resize(tuple(shape))
            continue
        group.create_array(
            name,
            shape=tuple(shape),
            chunks=(chunk_tokens, *shape[1:]),
            dtype=dtype,
            dimension_names=spec.dims,
            compressors=_compressor(),
            fill_value=0,
            attributes={"doc": spec.doc, "aligned_with": "token_index of the tokens table",
                        "written_by": "selfrepair ingest"},
        )


def write_region(path: Path, name: str, start: int, values: np.ndarray) -> None:
    """Write rows [start, start + len(values)) of one array."""
    try:
        arr = zarr.open_array(str(path / name), mode="r+")
        arr[start : start + values.shape[0]] = values.astype(arr.dtype, copy=False)
    except OSError as e:  # a full disk mid-chunk: one line; the shard is not committed, a rerun redoes it
        raise_store_error(path / name, e)
    except (ValueError, KeyError) as e:
        raise StoreError(f"{path / name}: the Zarr metadata is damaged ({type(e).__name__}); run selfrepair verify") from None


def read_region(path: Path, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
    arr = zarr.open_array(str(path / name), mode="r")
    return arr[start:stop]


def write_weights(path: Path, weights: dict[str, np.ndarray]) -> None:
    """Save the unembedding, W_O and the final W_out (float32) under `weights/`."""
    try:
        group = zarr.open_group(str(path), mode="a")
        wg = group.require_group("weights")
        for name, value in weights.items():
            if name in wg:
                del wg[name]
            wg.create_array(
                name, data=value.astype(np.float32), dimension_names=WEIGHT_ARRAYS[name],
                compressors=_compressor(), attributes={"doc": WEIGHT_DOCS[name]},
            )
    except OSError as e:
        raise_store_error(path / "weights", e)


def array_info(path: Path) -> dict[str, dict]:
    """Shape, dtype and dimension names of every array present (for the manifest and verify).

    Raises:
        StoreError: a damaged `zarr.json` (group or array), as one line.
    """
    if not path.exists():
        return {}
    try:
        return _array_info(path)
    except Exception as e:  # noqa: BLE001 - zarr raises JSON, value and key errors on damaged metadata
        raise StoreError(f"{path}: the Zarr metadata is damaged ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None


def _array_info(path: Path) -> dict[str, dict]:
    group = zarr.open_group(str(path), mode="r")
    out = {}
    for name in sorted(group.array_keys()):
        arr = group[name]
        out[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "dims": list(arr.metadata.dimension_names or [])}
    if "weights" in group:
        for name in sorted(group["weights"].array_keys()):
            arr = group["weights"][name]
            out[f"weights/{name}"] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "dims": list(arr.metadata.dimension_names or [])}
    return out


def checked_arrays(path: Path, manifest: Manifest) -> tuple[dict[str, dict], dict[str, str]]:
    """`array_info` of an `activations.zarr` that passed `check_tree`, and its `shape_problems`.

    Raises:
        StoreError: a symlink, FIFO or oversized zarr.json in the tree, or damaged metadata.
    """
    check_tree(path)
    found = array_info(path)
    try:
        grid = _chunk_grid(path)
    except Exception as e:  # noqa: BLE001 - as in array_info
        raise StoreError(f"{path}: the Zarr metadata is damaged ({type(e).__name__})") from None
    return found, shape_problems({k: v | {"chunks": grid.get(k)} for k, v in found.items()}, manifest)


def _chunk_grid(path: Path) -> dict[str, list[int]]:
    """Each array's chunk shape (not part of the manifest's record)."""
    group = zarr.open_group(str(path), mode="r")
    out = {name: list(group[name].chunks) for name in group.array_keys()}
    if "weights" in group:
        out |= {f"weights/{name}": list(group["weights"][name].chunks) for name in group["weights"].array_keys()}
    return out


def region_chunks(path: Path, name: str, start: int, stop: int) -> list[Path]:
    """The chunk files holding token rows [start, stop) of one array (chunks span every other dim)."""
    arr = zarr.open_array(str(path / name), mode="r")
    step = arr.chunks[0]
    tail = ["0"] * (arr.ndim - 1)
    return [path / name / "c" / str(i) / Path(*tail) if tail else path / name / "c" / str(i)
            for i in range(start // step, -(-stop // step))]


def chunk_ranges(path: Path, name: str):
    """[start, stop) token ranges of one array's chunks along `token_index` (to stream it), lazily."""
    arr = zarr.open_array(str(path / name), mode="r")
    step, n = arr.chunks[0], arr.shape[0]
    return ((i, min(i + step, n)) for i in range(0, n, step))
