"""Resample pairing: which row's activations replace each row's, recorded in `resample_sources`."""

from __future__ import annotations

import numpy as np

from selfrepair.errors import ConfigError

RULE = (
    "sample 0: source_row = (row + batch_size) mod n_rows, the same row of the next batch, "
    "wrapping at the end (offset 1 when there is a single batch); sample k >= 1: a random "
    "derangement of the rows from numpy.random.default_rng(seed + k)"
)


def source_rows(n_rows: int, batch_size: int, sample: int, seed: int) -> np.ndarray:
    """The source row of every row for one resample draw; no row is its own source.

    Args:
        n_rows: rows in the run.
        batch_size: rows per batch.
        sample: the draw (0 is the paper's next-batch rule).
        seed: base seed of the extra draws.

    Returns:
        int array [n_rows].
    """
    if n_rows < 2:
        raise ConfigError("resample ablation needs at least 2 rows; raise --tokens or use mean/zero")
    rows = np.arange(n_rows)
    if sample == 0:
        offset = batch_size % n_rows or 1
        return (rows + offset) % n_rows
    perm = np.random.default_rng(seed + sample).permutation(n_rows)
    fixed = np.nonzero(perm == rows)[0]
    # Rotate the fixed points among themselves (or swap one with a neighbour) to derange.
    if len(fixed) == 1:
        i = fixed[0]
        j = (i + 1) % n_rows
        perm[i], perm[j] = perm[j], perm[i]
    elif len(fixed) > 1:
        perm[fixed] = perm[np.roll(fixed, 1)]
    return perm
