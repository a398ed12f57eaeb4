"""How the engine tests compare two stores' ablation rows (tests/ingest/test_engines.py, test_embedded.py)."""

import polars as pl

KEY = ["ablation", "sample", "layer", "head", "token_index"]
VALUES = ["d_logit", "ln_scale", "de", "d_de_heads", "d_de_mlps"]


def close(a: pl.Series, b: pl.Series, what) -> None:
    """Logit-valued columns agree to 1e-4 (absolute); the norm scale, which reaches ~300 at
    BOS, to 1e-5 relative (float32 keeps about 7 digits)."""
    if a.name == "ln_scale":
        assert ((a - b).abs() / b.abs()).max() < 1e-5, what
    else:
        assert (a - b).abs().max() < 1e-4, what
