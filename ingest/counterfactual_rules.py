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


# -- which rows and positions a re-run runs ---------------------------------------------------
@dataclass(frozen=True)
class Cut:
    """The rows of a batch one pass runs and its positions `0..n_pos-1`.

    A pass may serve several units of one first layer (`pass_groups`): `rows` then holds, unit by unit,
    each unit's rows (a row once per unit that needs it), and `owner[i]` says whose row i is (the unit's
    place in its group). Without `owner` every row is the one unit's.
    """

    rows: np.ndarray
    n_pos: int
    owner: np.ndarray | None = None

    def owners(self) -> np.ndarray:
        return np.zeros(len(self.rows), np.int64) if self.owner is None else self.owner


# Passes a group's rows may be split into by their last position. Measured on the benchmark's top sets
# (bench_counterfactuals: 36 heads, 9 per first layer, batches of 4 rows): 1, 2, 3, 4 and 6 passes run
# 84%, 62%, 56%, 53% and 51% of a full sweep's depth-weighted positions; each pass has its fixed cost
# per layer. 6 against 4: 3% less time for both counterfactuals (9.0 s against 9.3 s, two runs each).
MAX_CUTS = 6


def _split(last: np.ndarray, max_cuts: int) -> list[tuple[int, int]]:
    """Ranges [j, i) splitting `last` (sorted ascending) into at most `max_cuts` groups with the fewest
    cells, a group costing its size × its largest value (exact, by dynamic programming)."""
    n = len(last)
    best = np.full((max_cuts + 1, n + 1), np.inf)
    back = np.zeros((max_cuts + 1, n + 1), np.int64)
    best[0, 0] = 0
    j = np.arange(n + 1)
    for g in range(1, max_cuts + 1):
        for i in range(1, n + 1):
            c = best[g - 1, :i] + (i - j[:i]) * float(last[i - 1])
            back[g, i] = int(np.argmin(c))  # the first minimum: the same split on every run
            best[g, i] = c[back[g, i]]
    g = min(range(1, max_cuts + 1), key=lambda k: (best[k, n], k))
    out, i = [], n
    while i > 0:
        out.append((int(back[g, i]), i))
        i, g = int(back[g, i]), g - 1
    return out[::-1]


def cuts_for(local_tokens: list[np.ndarray], preds: int, max_cuts: int = MAX_CUTS) -> list[Cut]:
    """The passes that re-run a group of units (each unit's batch-local top tokens, flat indices
    row · preds + pos): every row holding one of a unit's tokens, once per such unit, in at most `max_cuts`
    passes, each run up to its own rows' last position; [] without a token.

    Attention is causal, so a unit's row needs positions up to the unit's last top token in it only; the
    (unit, row) pairs sorted by that position are split where the split saves the most rows × positions.
    Within a pass the rows go unit by unit, each unit's in row order.
    """
    owner, row, last = [], [], []
    for j, flat in enumerate(local_tokens):
        flat = np.asarray(flat, np.int64)
        if not len(flat):
            continue
        rows = flat // preds
        for r in np.unique(rows):
            owner.append(j)
            row.append(int(r))
            last.append(int((flat[rows == r] % preds).max()) + 1)
    if not owner:
        return []
    owner, row, last = np.array(owner), np.array(row), np.array(last)
    order = np.lexsort((row, owner, last))  # by last position; ties in (unit, row) order
    owner, row, last = owner[order], row[order], last[order]
    out = []
    for j, i in _split(last, max_cuts):
        keep = np.lexsort((row[j:i], owner[j:i]))
        o = owner[j:i][keep]
        out.append(Cut(row[j:i][keep], int(last[i - 1]), o if len(local_tokens) > 1 else None))
    return out


def pass_groups(units, n_heads: int, per_pass: int, post_norm: bool) -> list[list]:
    """The units whose re-runs share passes: units of one first layer, `per_pass` at a time, that replace
    nothing after that layer and either all or none of them its MLP write; every other unit alone.

    Sharing a pass is exact only so: rows of a pass are independent, and a unit's row there gets the
    baseline's values for the other units' components, which at the first layer change nothing (its
    input is the baseline's, and the engine takes only the change of its attention output). A component
    after the first layer, or an MLP the pass runs for some rows and replaces for others, would need the
    pass to treat rows apart; and with an attention post-norm every head of the first layer changes its
    DE with the norm's scale, which the pass does not give per unit. Groups keep the units' order.
    """
    alone, shared = [], {}
    for unit in units:
        layers = {layer for layer, _ in unit.heads(n_heads)} | set(unit.mlps())
        if post_norm or layers != {unit.layer}:
            alone.append([unit])
        else:
            shared.setdefault((unit.layer, unit.layer in unit.mlps()), []).append(unit)
    groups = [members[i:i + per_pass] for _, members in sorted(shared.items())
              for i in range(0, len(members), max(per_pass, 1))]
    return sorted(groups + alone, key=lambda g: g[0].layer)


@dataclass
class RunFraction:
    """Token-positions the counterfactual re-runs compute, against a full extra sweep of the same units (every
    unit a copy of every row at every position)."""

    rows: int = 0  # rows run, summed over the units' passes
    rows_full: int = 0
    cells: int = 0  # rows × positions run
    cells_full: int = 0

    def add(self, cuts: list[Cut], batch: int, seq: int, n_units: int = 1) -> None:
        """The passes of `n_units` units in one batch of `batch` rows of `seq` positions."""
        self.rows_full += batch * n_units
        self.cells_full += batch * seq * n_units
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
                f"token positions of a full sweep (each unit on the rows holding one of its top tokens, up to its "
                f"last top position there; units of one first layer share passes)")


def batch_groups(top_sets: dict[str, np.ndarray], units, t0: int, t1: int, n_heads: int, per_pass: int,
                 post_norm: bool) -> list[tuple[list, list[np.ndarray]]]:
    """The pass groups of one batch (tokens t0..t1-1) with each member's batch-local top tokens: only the
    units with a top token in the batch (`pass_groups`)."""
    local = {}
    for unit in units:
        top = np.asarray(top_sets.get(unit.label, np.empty(0, np.int64)), np.int64)
        here = top[np.searchsorted(top, t0):np.searchsorted(top, t1)] - t0
        if len(here):
            local[unit.label] = here
    active = [unit for unit in units if unit.label in local]
    return [(g, [local[u.label] for u in g]) for g in pass_groups(active, n_heads, per_pass, post_norm)]


def run_fraction(top_sets: dict[str, np.ndarray], units, n_rows: int, batch_size: int, seq_len: int,
                 n_heads: int, per_pass: int, post_norm: bool) -> RunFraction:
    """What share of a sweep's rows and positions one counterfactual re-runs, from the top sets alone: per
    batch, the passes `counterfactual.batch_reruns` runs (`batch_groups`, then `cuts_for` per group).

    Args:
        top_sets: each unit's top-p% token indices (global, sorted), by label.
        units: the sweep's units.
        n_rows, batch_size, seq_len: the run's rows, batches and row length (BOS included).
        n_heads, per_pass, post_norm: the model's heads per layer, the units per pass, whether its
            attention has a post-norm (`pass_groups`).
    """
    preds = seq_len - 1
    out = RunFraction()
    for r0 in range(0, n_rows, batch_size):
        r1 = min(n_rows, r0 + batch_size)
        groups = batch_groups(top_sets, units, r0 * preds, r1 * preds, n_heads, per_pass, post_norm)
        for group, local in groups:
            out.add(cuts_for(local, preds), r1 - r0, seq_len, len(group))
        out.add([], r1 - r0, seq_len, len(units) - sum(len(g) for g, _ in groups))
    return out
