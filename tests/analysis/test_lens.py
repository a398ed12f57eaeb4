"""The logit lens of a unit page (issue 23): what each unit kind writes, from the stored activations and
weights, against a recomputation that reads the Zarr arrays and Parquet rows directly (no project code
but the file list), and what each kind cannot show."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from test_unit_pages import MODEL, _top_tokens

from selfrepair.store.labels import parse_unit


def _read(store, name: str) -> np.ndarray:
    return np.asarray(zarr.open_array(str(store / MODEL / "activations.zarr" / name), mode="r")[...], dtype=np.float64)


def _expected(store, canonical: str, n_heads: int = 4, n_layers: int = 2) -> np.ndarray:
    """Mean over the unit's top tokens of (Σ its heads' z @ W_O [+ the final MLP's post @ W_out]) / s, @ W_U."""
    top = np.sort(np.asarray(_top_tokens(store, canonical)))
    unit = parse_unit(canonical)
    z, w_o = _read(store, "z")[top], _read(store, "weights/W_O")
    write = sum(z[:, l, h] @ w_o[l, h] for l, h in unit.heads(n_heads))
    if n_layers - 1 in unit.mlps():
        write = write + _read(store, "mlp_post_final")[top] @ _read(store, "weights/W_out_final")
    s = _read(store, "norm_scales")[top, -1]
    return (write / s[:, None]).mean(0) @ _read(store, "weights/W_U")


@pytest.fixture(scope="module")
def lens_data(unit_store):
    from selfrepair.queries.store import Store

    with Store.open(unit_store) as s:
        yield s.activations(MODEL)


@pytest.mark.parametrize("label,canonical,covers,note", [
    ("L1H2", "L1H2", "head L1H2 (z @ W_O)", ""),
    ("bk", "L1H0+L1H3", "heads L1H0, L1H3 (z @ W_O)", ""),
    ("ATTN0", "ATTN0", "heads L0H0, L0H1, L0H2, L0H3 (z @ W_O)", ""),
    ("MLP1", "MLP1", "MLP1's neurons (mlp_post_final @ W_out_final, no output bias)", ""),
    ("BLOCK1", "BLOCK1", "heads L1H0, L1H1, L1H2, L1H3 (z @ W_O) and MLP1's neurons (mlp_post_final @ W_out_final, "
                         "no output bias)", ""),
    ("BLOCK0", "BLOCK0", "heads L0H0, L0H1, L0H2, L0H3 (z @ W_O)",
     "leaves out MLP0 (the store keeps only the final MLP's activations)"),
])
def test_lens_against_a_recomputation(unit_store, lens_data, label, canonical, covers, note):
    from selfrepair.analysis.lens import unit_lens

    top = _top_tokens(unit_store, canonical)
    lens, why = unit_lens(lens_data, parse_unit(canonical), 2, 4, top, k=10)
    want = _expected(unit_store, canonical)
    assert lens.covers == covers and why == note and lens.n_tokens == len(top) == 6
    order = np.argsort(-want, kind="stable")
    # (the lens multiplies by W_U in float32, as stored: the order may differ only between near-ties)
    assert set(lens.promoted["token_id"].to_list()[:8]) <= set(order[:10].tolist())
    assert set(lens.suppressed["token_id"].to_list()[:8]) <= set(order[::-1][:10].tolist())
    np.testing.assert_allclose(lens.promoted["value"].to_numpy(), want[lens.promoted["token_id"].to_numpy()],
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(lens.promoted["value"].to_numpy(), want[order[:10]], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(lens.suppressed["value"].to_numpy(), want[order[::-1][:10]], rtol=1e-5, atol=1e-7)
    assert lens.promoted["value"].to_list() == sorted(lens.promoted["value"].to_list(), reverse=True)


def test_what_a_lens_cannot_show(unit_store, lens_data):
    from selfrepair.analysis.lens import unit_lens

    top = _top_tokens(unit_store, "MLP0")
    assert unit_lens(lens_data, parse_unit("MLP0"), 2, 4, top) == (
        None, "not available: MLP0 (the store keeps only the final MLP's activations)")
    assert unit_lens(None, parse_unit("L1H2"), 2, 4, top) == (
        None, "not available: the store keeps no activations (ingested with --activations none)")
    assert unit_lens(lens_data, parse_unit("L1H2"), 2, 4, top, post_norm=True) == (
        None, "not available: the model has post-norm blocks (a head's write divides by a per-block scale the "
              "lens lacks)")
    assert unit_lens(lens_data.drop_vars("z"), parse_unit("BLOCK1"), 2, 4, top)[1] == (
        "leaves out its heads (the store keeps no z)")
