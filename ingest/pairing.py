"""Resample pairing: which row's activations replace each row's, recorded in `resample_sources`.

The pairs of a batch depend only on the batch and the rows before it (and, for the last
batch and batch 0, on whether a next batch exists yet), never on how many rows follow:
extending a store with more tokens leaves every earlier batch's stored pairs valid. The
few batches whose pairs do change are re-ablated and their old shards superseded.
"""

from __future__ import annotations

import hashlib

import numpy as np

from selfrepair.errors import ConfigError

RULE = (
    "batches of batch_size rows; sample 0: source_row = row + batch_size (the same row of the "
    "next batch, wrapping within a partial next batch), in the last batch row - batch_size "
    "(the previous batch), with a single batch "
    "(row + 1) mod n_rows; sample k >= 1: rows of batch b >= 1 draw a row of batches 0..b-1 and "
    "rows of batch 0 a row of batch 1, uniformly with numpy.random.default_rng([seed, k, b]); "
    "with a single batch a seeded derangement of its rows"
)


# The authors' dataset_generator: batch b's corrupted prompts are batch b+1, and the last batch,
# finding no rows after it, loops back to batch 0. Their runs held whole batches only.
PAPER_RULE = (
    "preset paper: whole batches of batch_size rows (a partial last batch dropped), at least two; "
    "sample 0: source_row = (row + batch_size) mod n_rows, the same row of the next batch, the last "
    "batch's from batch 0, so no row's source is in its own batch; sample k >= 1: as the default rule"
)


def rule(whole_batches: bool) -> str:
    """The pairing rule recorded in the manifest."""
    return PAPER_RULE if whole_batches else RULE


def source_rows(n_rows: int, batch_size: int, sample: int, seed: int, r0: int = 0, r1: int | None = None,
                whole_batches: bool = False) -> np.ndarray:
    """The source row of rows [r0, r1) for one resample draw; no row is its own source.

    With `whole_batches` (the paper preset) no row's source is in its own batch either.

    Args:
        n_rows: rows in the run.
        batch_size: rows per batch.
        sample: the draw (0 is the paper's next-batch rule).
        seed: base seed of the extra draws.
        r0, r1: the rows asked for (default: all), batch-aligned at r0.
        whole_batches: the paper preset's rule (PAPER_RULE) on a run of whole batches.

    Returns:
        int64 array [r1 - r0].
    """
    if n_rows < 2:
        raise ConfigError("resample ablation needs at least 2 rows; raise --tokens or use mean/zero")
    r1 = n_rows if r1 is None else r1
    if whole_batches:
        if n_rows % batch_size or n_rows < 2 * batch_size:
            raise ConfigError(f"resample ablation with preset paper needs at least two whole batches of "
                              f"{batch_size} rows; got {n_rows} rows")
        if sample == 0:
            return (np.arange(r0, r1) + batch_size) % n_rows
    n_batches = -(-n_rows // batch_size)
    if n_batches == 1:
        rows = np.arange(n_rows)
        if sample == 0:
            return ((rows + 1) % n_rows)[r0:r1]
        return _derangement(np.random.default_rng([seed, sample, 0]), n_rows)[r0:r1]
    out = []
    for b0 in range(r0 - r0 % batch_size, r1, batch_size):
        b = b0 // batch_size
        rows = np.arange(b0, min(b0 + batch_size, n_rows))
        if sample == 0:
            if b == n_batches - 1:
                src = rows - batch_size
            else:  # the next batch may be a partial last one: wrap within it
                n_next = min(batch_size, n_rows - b0 - batch_size)
                src = b0 + batch_size + (rows - b0) % n_next
        else:
            rng = np.random.default_rng([seed, sample, b])
            if b == 0:
                src = rng.integers(batch_size, min(2 * batch_size, n_rows), size=batch_size)[:len(rows)]
            else:
                src = rng.integers(0, b0, size=batch_size)[:len(rows)]
        out.append(src)
    full = np.concatenate(out)
    start = r0 - (r0 - r0 % batch_size)
    return full[start:start + (r1 - r0)]


def _derangement(rng: np.random.Generator, n: int) -> np.ndarray:
    rows = np.arange(n)
    perm = rng.permutation(n)
    fixed = np.nonzero(perm == rows)[0]
    # Rotate the fixed points among themselves (or swap one with a neighbour) to derange.
    if len(fixed) == 1:
        i = fixed[0]
        j = (i + 1) % n
        perm[i], perm[j] = perm[j], perm[i]
    elif len(fixed) > 1:
        perm[fixed] = perm[np.roll(fixed, 1)]
    return perm


def pairs_digest(pairs: np.ndarray) -> str:
    """A short digest of a batch's pairs, recorded per shard: a stored shard is valid while it matches."""
    return hashlib.sha256(np.asarray(pairs, dtype=np.int64).tobytes()).hexdigest()[:16]
