"""Zarr v3 arrays of the clean run (token-major) and the weights needed to recompute DEs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from selfrepair.errors import StoreError
from selfrepair.store.files import raise_store_error
from selfrepair.store.schema import ARRAYS, WEIGHT_ARRAYS, WEIGHT_DOCS


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


def region_chunks(path: Path, name: str, start: int, stop: int) -> list[Path]:
    """The chunk files holding token rows [start, stop) of one array (chunks span every other dim)."""
    arr = zarr.open_array(str(path / name), mode="r")
    step = arr.chunks[0]
    tail = ["0"] * (arr.ndim - 1)
    return [path / name / "c" / str(i) / Path(*tail) if tail else path / name / "c" / str(i)
            for i in range(start // step, -(-stop // step))]


def chunk_ranges(path: Path, name: str) -> list[tuple[int, int]]:
    """[start, stop) token ranges of one array's chunks along `token_index` (to stream it)."""
    arr = zarr.open_array(str(path / name), mode="r")
    step = arr.chunks[0]
    return [(i, min(i + step, arr.shape[0])) for i in range(0, arr.shape[0], step)]
