"""The Zarr activations of one model as an xarray Dataset, and DEs toward any token.

    >>> acts = Store.open("stores").activations("smollm2-135m")
    >>> acts.z.sel(layer=26, head=6)                      # lazy: read on access
    >>> head_de(acts, 26, 6, token_ids)                   # a head's DE toward any token per position

Dimensions are named (`token_index`, `layer`, `head`, `d_head`, `d_model`, `norm`, …) and
carry coordinates: token indices with their row, position and token strings, layer and
head numbers, the norm modules' names (the last is the final norm). The weights saved
beside the activations (`W_O`, `W_U`, `b_U`, `W_out_final`) are variables too, and the
`vocab` table gives every token id's string.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from selfrepair.errors import StoreError
from selfrepair.store import arrays
from selfrepair.store.manifest import Manifest


def open_activations(folder: Path, manifest: Manifest, tokens=None, vocab=None):
    """The model folder's `activations.zarr` as a lazy `xarray.Dataset`.

    Args:
        folder: the model folder.
        manifest: its manifest (for the norm names and shapes).
        tokens: the model's `tokens` rows (token_index, row, pos, token_str, next_token_str) as a
            Polars frame, for coordinates along `token_index` (None: indices only).
        vocab: the `vocab` rows (token_id, token_str), for the `d_vocab` coordinate (None: ids only).

    Raises:
        StoreError: the store keeps no activations, or they fail verify's checks: anything in
            `activations.zarr` symlinked (out of the store), a FIFO or device, an oversized
            zarr.json, or a shape that does not fit the model and the tokens (refused before
            anything is allocated).
    """
    import xarray as xr

    path = folder / "activations.zarr"
    if not os.path.lexists(path) or not manifest.arrays:
        raise StoreError(f"{folder.name} keeps no activations (ingested with --activations none)")
    found, misfit = arrays.checked_arrays(path, manifest)  # the one check verify makes too
    for name, info in sorted(manifest.arrays.items()):
        if name in misfit:
            raise StoreError(f"{path}/{name}: {misfit[name]}; run selfrepair verify")
        if name not in found or tuple(found[name]["shape"]) != info.shape:
            got = found[name]["shape"] if name in found else "missing"
            raise StoreError(f"{path}/{name}: shape {got} differs from the manifest's {list(info.shape)}; "
                             "run selfrepair verify")
    ds = xr.open_zarr(str(path), consolidated=False, chunks=None, zarr_format=3)
    weights = xr.open_zarr(str(path), group="weights", consolidated=False, chunks=None, zarr_format=3)
    ds = ds.merge(weights.rename({name: name for name in weights.data_vars}))
    model = manifest.model
    coords = {dim: np.arange(ds.sizes[dim]) for dim in ("token_index", "layer", "head") if dim in ds.sizes}
    if "norm" in ds.sizes:
        names = list(model.norm_names)
        coords["norm"] = names if len(names) == ds.sizes["norm"] else np.arange(ds.sizes["norm"])
    ds = ds.assign_coords(coords)
    if tokens is not None and tokens.height == ds.sizes["token_index"]:
        ds = ds.assign_coords({c: ("token_index", tokens[c].to_numpy()) for c in
                               ("row", "pos", "token_str", "next_token_str") if c in tokens.columns})
    if vocab is not None and "d_vocab" in ds.sizes and vocab.height == ds.sizes["d_vocab"]:
        ds = ds.assign_coords(d_vocab=vocab["token_id"].to_numpy(), vocab_str=("d_vocab", vocab["token_str"].to_numpy()))
    ds.attrs.update({"model": model.name or folder.name, "n_tokens": manifest.n_tokens,
                     "final_norm": "the last `norm` entry scales the residual before the unembedding"})
    return ds


def head_de(ds, layer: int, head: int, token_ids) -> np.ndarray:
    """A head's direct effect toward `token_ids` (one id per token_index, or one for all), per token.

    DE = (z[t, layer, head] · W_O[layer, head]) · W_U[:, id] / s_final[t], the definition the
    ingest stores in `head_effects` for the true next token (DESIGN.md, float32 here from
    the stored activations).
    """
    z = ds["z"].sel(layer=layer, head=head).values.astype(np.float64)  # [token, d_head]
    w_o = ds["W_O"].sel(layer=layer, head=head).values.astype(np.float64)  # [d_head, d_model]
    w_u = ds["W_U"].values
    ids = np.broadcast_to(np.asarray(token_ids), (z.shape[0],))
    s = ds["norm_scales"].isel(norm=-1).values.astype(np.float64)
    out = z @ w_o  # [token, d_model]
    return np.einsum("tm,mt->t", out, w_u[:, ids].astype(np.float64)) / s
