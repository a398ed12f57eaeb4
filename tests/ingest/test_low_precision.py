"""bfloat16 and float16 sweeps: only the matrix products run in low precision.

The clean pass is float32 and every ablated quantity is the clean value plus a
difference of two low-precision runs from the same residual, so the identities hold as
in float32 and the errors stay a small fraction of the effects they measure.
"""

import numpy as np
import pytest

from selfrepair import Store
from tiny_models import ingest_tiny

COLUMNS = ("d_logit", "d_de_heads", "d_de_mlps")
MAX_MEAN_ERROR = 0.02  # of the column's mean magnitude (issue 12's target)
TOL = 1e-4


@pytest.fixture(scope="module")
def stores(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("lowp")
    out = {}
    for dtype in ("float32", "bfloat16", "float16"):
        out[dtype] = root / dtype
        ingest_tiny(tiny_model_dirs["llama"], out[dtype], dtype=dtype, tokens=124, activations=False)
    return out


def _effects(store):
    return Store.open(store).sql(
        f"SELECT {', '.join(COLUMNS)} FROM ablation_effects ORDER BY ablation, sample, layer, head, token_index")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_error_is_small(stores, dtype):
    ref, low = _effects(stores["float32"]), _effects(stores[dtype])
    assert ref.height == low.height > 0
    for col in COLUMNS:
        a, b = ref[col].to_numpy(), low[col].to_numpy()
        rel = np.abs(b - a).mean() / np.abs(a).mean()
        assert rel <= MAX_MEAN_ERROR, f"{dtype} {col}: mean error {rel:.2%} of mean magnitude"
        assert not np.array_equal(a, b), "the low-precision run must actually differ from float32"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_identities_hold_in_every_dtype(stores, dtype):
    store = Store.open(stores[dtype])
    assert store.query("check_de_identity")["max_abs_error"].max() < TOL
    ln = store.query("check_ln_identity")
    assert len(ln) == 3 and ln["max_abs_error"].max() < TOL


def test_clean_pass_is_float32_in_every_dtype(stores):
    q = "SELECT token_index, logit, ln_scale FROM tokens ORDER BY token_index"
    ref = Store.open(stores["float32"]).sql(q)
    for dtype in ("bfloat16", "float16"):
        assert Store.open(stores[dtype]).sql(q).equals(ref)
