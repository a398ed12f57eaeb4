"""Error bars from a query's confidence-interval columns (`<x>_ci_low`, `<x>_ci_high`: queries/bootstrap.py)."""

from __future__ import annotations

import numpy as np
import polars as pl

CI_NOTE = ("Error bars: {level:.0%} confidence intervals of the means, by a seeded bootstrap over rows "
           "(tokens of one row are correlated)")


def ci_err(df: pl.DataFrame, column: str) -> np.ndarray | None:
    """matplotlib's `yerr`/`xerr` for `column` ([2, n]: distances below and above the mean), or None when
    the frame has no interval for it (a query without one, e.g. the authors' statistic)."""
    low, high = f"{column}_ci_low", f"{column}_ci_high"
    if low not in df.columns or high not in df.columns:
        return None
    mean = df[column].cast(pl.Float64).to_numpy()
    lo, hi = df[low].cast(pl.Float64).to_numpy(), df[high].cast(pl.Float64).to_numpy()
    # A bootstrap percentile may sit on the other side of the mean by rounding only: clip at 0.
    return np.nan_to_num(np.vstack([np.maximum(mean - lo, 0), np.maximum(hi - mean, 0)]))


def ci_note(level: float = 0.95) -> str:
    return CI_NOTE.format(level=level)
