"""Counterfactual re-runs without torch: their names, which family can run which, and which rows and
positions a re-run computes (ingest/counterfactual.py runs them). Cheap to import: the config and the
pre-load checks use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from selfrepair.errors import ConfigError
from selfrepair.ingest.families import family_named
from selfrepair.store.schema import COUNTERFACTUAL_NAMES

FROZEN_NORMS, FROZEN_ATTENTION = COUNTERFACTUALS = COUNTERFACTUAL_NAMES

# Families whose attention module computes its own softmax instead of calling
# `ALL_ATTENTION_FUNCTIONS` (transformers 5), so a recorded pattern cannot be swapped in.
NOT_THROUGH_INTERFACE = {
    "GPT-Neo": "its attention (GPTNeoSelfAttention) computes the softmax itself, not through transformers' "
               "AttentionInterface",
    "BLOOM": "its attention (BloomAttention, ALiBi) computes the softmax itself, not through transformers' "
             "AttentionInterface",
}


def parse_counterfactuals(value) -> tuple[str, ...]:
    """A comma list (or sequence) of counterfactual names, each once in the order given; `none` or empty: ().

    Raises:
        ValueError: an unknown name (naming it and the choices).
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(dict.fromkeys(str(x).strip() for x in items if str(x).strip()))
    if names == ("none",):
        return ()
    for name in names:
        if name not in COUNTERFACTUALS:
            raise ValueError(f"unknown counterfactual {name!r}; choose from none, {', '.join(COUNTERFACTUALS)}")
    return names


def counterfactual_problem(family: str, name: str) -> str | None:
    """Why the family (a name like "GPT-2" or an architecture like "GPT2LMHeadModel") cannot run the
    counterfactual `name`, or None. Needs no model, so a run asks before it loads one."""
    fam = family_named(family)
    if fam is None:
        return None  # an unsupported family is refused by name elsewhere
    if name == FROZEN_ATTENTION and fam.name in NOT_THROUGH_INTERFACE:
        return f"{fam.name}: {NOT_THROUGH_INTERFACE[fam.name]}, so frozen-attention cannot replace its patterns"
    if name == FROZEN_NORMS and fam.attn_post:
        return (f"{fam.name}: a head's DE in post-norm blocks is defined at the run's own post-norm scale "
                "(DESIGN.md), which frozen-norms would contradict")
    return None


def check_counterfactuals(names, family: str) -> None:
    """Refuse (ConfigError, one line) a requested counterfactual the family cannot run."""
    for name in names:
        problem = counterfactual_problem(family, name)
        if problem:
            raise ConfigError(f"counterfactuals: {problem}")


# -- which rows and positions a unit's re-run runs ---------------------------------------------
@dataclass(frozen=True)
class Cut:
    """The rows of a batch a pass keeps (sorted local indices) and its positions `0..n_pos-1`."""

    rows: np.ndarray
    n_pos: int


# Passes a unit's rows may be split into by their last position. Measured on the benchmark's top sets
# (bench_counterfactuals: 36 heads, batches of 4 rows): a third pass saves 2.5% of the positions for
# 43% more passes, each with its fixed cost per layer; one pass runs 25% more positions than two.
MAX_CUTS = 2


def cuts_for(local_tokens: list[np.ndarray], preds: int, max_cuts: int = MAX_CUTS) -> list[Cut]:
    """The rows holding one of the tokens (batch-local flat indices row · preds + pos), in at most `max_cuts`
    groups of rows, each run up to its own last position; [] without a token.

    Attention is causal, so a row needs positions up to its own last top token only; rows sorted by that
    position are split where the split saves the most rows × positions (exact, by dynamic programming),
    each group a pass of its own.
    """
    flat = np.concatenate(local_tokens) if local_tokens else np.empty(0, np.int64)
    if not len(flat):
        return []
    rows = flat // preds
    uniq = np.unique(rows)
    last = np.array([int((flat[rows == r] % preds).max()) + 1 for r in uniq])
    order = np.argsort(last, kind="stable")
    uniq, last = uniq[order], last[order]
    n = len(uniq)
    # best[g][i]: fewest cells covering the first i rows (by last position) with g groups; a group
    # of rows j..i-1 costs (i - j) × last[i - 1], the largest position in it.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(max_cuts + 1)]
    back = [[0] * (n + 1) for _ in range(max_cuts + 1)]
    best[0][0] = 0
    for g in range(1, max_cuts + 1):
        for i in range(1, n + 1):
            for j in range(i):
                c = best[g - 1][j] + (i - j) * int(last[i - 1])
                if c < best[g][i]:
                    best[g][i], back[g][i] = c, j
    g = min(range(1, max_cuts + 1), key=lambda k: (best[k][n], k))
    out, i = [], n
    while i > 0:
        j = back[g][i]
        out.append(Cut(np.sort(uniq[j:i]), int(last[i - 1])))
        i, g = j, g - 1
    return out[::-1]


@dataclass
class RunFraction:
    """Token-positions the counterfactual re-runs compute, against a full extra sweep of the same units (every
    unit a copy of every row at every position)."""

    rows: int = 0  # rows run, summed over the units' passes
    rows_full: int = 0
    cells: int = 0  # rows × positions run
    cells_full: int = 0

    def add(self, cuts: list[Cut], batch: int, seq: int) -> None:
        """One unit's passes in one batch of `batch` rows of `seq` positions."""
        self.rows_full += batch
        self.cells_full += batch * seq
        for cut in cuts:
            self.rows += len(cut.rows)
            self.cells += len(cut.rows) * cut.n_pos

    @property
    def row_fraction(self) -> float:
        return self.rows / max(self.rows_full, 1)

    @property
    def cell_fraction(self) -> float:
        return self.cells / max(self.cells_full, 1)

    def line(self) -> str:
        return (f"counterfactual re-runs: {self.row_fraction:.1%} of the rows and {self.cell_fraction:.1%} of the "
                f"token positions of a full sweep (each unit alone: the rows holding one of its top tokens, each "
                f"group of them up to its last top position)")


def run_fraction(top_sets: dict[str, np.ndarray], units, n_rows: int, batch_size: int, seq_len: int) -> RunFraction:
    """What share of a sweep's rows and positions one counterfactual re-runs, from the top sets alone: per
    batch and unit, the cuts `counterfactual.batch_reruns` runs (`cuts_for` of the unit's own top tokens).

    Args:
        top_sets: each unit's top-p% token indices (global, sorted), by label.
        units: the sweep's units.
        n_rows, batch_size, seq_len: the run's rows, batches and row length (BOS included).
    """
    preds = seq_len - 1
    out = RunFraction()
    for r0 in range(0, n_rows, batch_size):
        r1 = min(n_rows, r0 + batch_size)
        t0, t1 = r0 * preds, r1 * preds
        for unit in units:
            top = top_sets.get(unit.label, np.empty(0, np.int64))
            local = top[np.searchsorted(top, t0):np.searchsorted(top, t1)] - t0
            out.add(cuts_for([local], preds), r1 - r0, seq_len)
    return out
