"""What is already stored, and what a run still has to do, in (ablation, sample, condition, unit, batch) units.

A shard is identified by its batch rows, its ablation and draw, its condition and the exact
units it ablated (its entry's `units` and `condition`; a shard written before units holds
its `heads` as head units, unconditioned), so a new run with more `--units`, another
condition, another ablation type or more draws does only the missing units. A stored shard
whose batch changed (the partial last batch grew), whose resample pairs changed, or whose
repair/neuron detail was written for other top-p% token sets (more tokens change every
unit's set) is invalid: its units are redone for the new batch in one shard per (draw,
condition) that supersedes the group's shards in the same commit, so keys never repeat.

One shard per batch and draw holds its `resample_sources` rows, one per batch, draw and
condition its `condition_tokens` rows (the condition-ablated run); a redone shard takes
them over from the shards it supersedes.

`--sr-mlps-neurons` adds `neurons` shards: neuron detail for each named head's top tokens by
sr_mlps that are not already detail tokens (`neuron_work`). A batch's `neurons` shards are
superseded with its unconditioned ablation shards, and redone when the extra token sets they hold change.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

from selfrepair.store.heads import heads_spec
from selfrepair.store.labels import Unit, head_unit, units_spec
from selfrepair.store.manifest import Manifest, ShardEntry
from selfrepair.store.schema import ABLATION_KINDS, SHARD_PHASES

Heads = list[tuple[int, int]]
NEURON_PHASE = SHARD_PHASES[2]  # shard phase of the extra neuron detail (`--sr-mlps-neurons`)


@dataclass
class CleanWork:
    """One clean batch to run and commit (superseding the shards of an older, shorter batch)."""

    rows: tuple[int, int]
    shard_id: str
    supersedes: list[str] = field(default_factory=list)


@dataclass
class AblationWork:
    """One ablation shard to run: a batch, an ablation draw, a condition and the units still missing there.

    Args:
        kind, sample: the ablation and draw.
        rows: the batch.
        units: the units to ablate, in `unit_order`.
        units_spec: the same as text (store/labels.py `units_spec`, recorded in the shard entry).
        shard_id: a new id (never one in the snapshot, so no file of a readable shard is replaced).
        supersedes: stored shards this one replaces.
        with_sources: whether this shard carries the batch's `resample_sources` rows.
        condition: the unit ablated under every unit of the shard (None: unconditioned).
        with_condition_tokens: whether this shard carries the batch's `condition_tokens` rows.
    """

    kind: str
    sample: int
    rows: tuple[int, int]
    units: list[Unit]
    units_spec: str
    shard_id: str
    supersedes: list[str] = field(default_factory=list)
    with_sources: bool = False
    condition: Unit | None = None
    with_condition_tokens: bool = False

    @property
    def condition_spec(self) -> str:
        return "" if self.condition is None else self.condition.spec

    @property
    def heads(self) -> Heads:
        """The (layer, head) of the head units (the neuron detail phase ablates heads only)."""
        return [(u.layer, u.head) for u in self.units if u.kind == "head"]

    @property
    def heads_spec(self) -> str:
        """The units as short text (what progress lines and errors show): `L0H0…L1H3 (8)` beyond four."""
        labels = [u.label for u in self.units]
        text = ",".join(labels) if len(labels) <= 4 else f"{labels[0]}…{labels[-1]} ({len(labels)})"
        return text + (f" | {self.condition.label}" if self.condition is not None else "")

    def entry_fields(self) -> dict:
        """What the shard entry records of its units: `units` and `condition` (store/manifest.py reads them)."""
        return {"units": self.units_spec, "condition": self.condition_spec}


def unit_order(unit: Unit) -> tuple:
    """Units in (first layer, head, label) order: head units sort as (layer, head) pairs did."""
    return unit.layer, unit.head, unit.kind != "head", unit.label


def batches(n_rows: int, batch_size: int) -> list[tuple[int, int]]:
    return [(r0, min(r0 + batch_size, n_rows)) for r0 in range(0, n_rows, batch_size)]


def _overlaps(rows, r0: int, r1: int) -> bool:
    return rows[0] < r1 and rows[1] > r0


def stored_rows(manifest: Manifest) -> int:
    """Rows covered by committed clean shards (0..this): an interrupted extension may have stored more than n_rows."""
    return max((e.rows[1] for e in manifest.shards.values() if e.phase == "clean"), default=0)


def clean_work(manifest: Manifest, n_rows: int, batch_size: int, *, damaged=frozenset()) -> list[CleanWork]:
    """The clean batches not yet stored as exactly that batch (a `damaged` shard counts as not stored)."""
    stored = {e.rows: sid for sid, e in manifest.shards.items() if e.phase == "clean"}
    clean = {rows: sid for rows, sid in stored.items() if sid not in damaged}
    out = []
    for r0, r1 in batches(n_rows, batch_size):
        if (r0, r1) in clean:
            continue
        old = [sid for rows, sid in stored.items() if _overlaps(rows, r0, r1)]
        out.append(CleanWork((r0, r1), f"clean-{r0:08d}-{r1:08d}", old))
    return out


def stored_draws(manifest: Manifest) -> list[tuple[str, int]]:
    """Every (ablation, sample) with at least one stored shard."""
    return sorted({e.draw for e in manifest.shards.values() if e.phase == "ablation"},
                  key=_draw_order)


def _draw_order(draw: tuple[str, int]) -> tuple[int, int]:
    kind, sample = draw
    return (ABLATION_KINDS.index(kind) if kind in ABLATION_KINDS else len(ABLATION_KINDS), sample)


def _units(manifest: Manifest, e: ShardEntry) -> tuple[Unit, ...]:
    return e.unit_list(manifest.model.n_layers, manifest.model.n_heads)


def _condition(manifest: Manifest, e: ShardEntry) -> Unit | None:
    return e.condition_unit(manifest.model.n_layers, manifest.model.n_heads)


def _same_top(entry: ShardEntry, manifest: Manifest, top_digest: Callable[[int, int, list], str] | None) -> bool:
    """Whether a stored shard's detail was written for the top-p% sets the store has now."""
    if top_digest is None:
        return True
    if entry.top_sha is None:  # written before the digest was recorded: its token count decides
        return entry.top_n_tokens in (None, manifest.n_tokens)  # None: older still, for the store's tokens
    r0, r1 = entry.rows
    return entry.top_sha == top_digest(r0, r1, list(_units(manifest, entry)))


def ablation_work(manifest: Manifest, n_rows: int, batch_size: int, asked_draws: list[tuple[str, int]],
                  asked_units: list, pairs_digest: Callable[[int, int, int], str],
                  top_digest: Callable[[int, int, list], str] | None = None, *,
                  condition: Unit | None = None, damaged=frozenset()) -> list[AblationWork]:
    """The ablation shards a run must write, batch by batch.

    Args:
        manifest: the store's snapshot.
        n_rows, batch_size: the run's rows and batch size.
        asked_draws: (ablation, sample) pairs this run asks for.
        asked_units: the units this run asks for (`Unit`s; (layer, head) pairs are head units).
        pairs_digest: (sample, r0, r1) -> digest of that batch's resample pairs now.
        top_digest: (r0, r1, units) -> digest of those units' top-p% tokens in the batch now
            (`store/top_tokens.batch_digest`); None: not checked.
        condition: the unit this run ablates its units under (None: unconditioned). Units sharing
            a component with it are left out (nothing to ablate on top of it).
        damaged: shard ids whose files are missing or damaged: redone like a changed batch.

    Returns:
        Work in batch order, then draw order, then condition order ("" first). Stored units of
        other conditions are redone only when their shards are invalid.
    """
    n_heads = manifest.model.n_heads
    cond_label = "" if condition is None else condition.label
    asked = {u.label: u for u in (_as_unit(x) for x in asked_units)
             if condition is None or not u.overlaps(condition, n_heads)}
    groups = _by_group(manifest, "ablation")
    detail = _by_draw(manifest, NEURON_PHASE)
    keys = set(groups) | {(k, s, cond_label) for k, s in asked_draws}
    keys = sorted(keys, key=lambda g: (_draw_order(g[:2]), g[2]))
    conditions = {g[2]: c for g in groups for _, e in groups[g][:1] for c in [_condition(manifest, e)]}
    conditions[cond_label] = condition
    taken = set(manifest.shards)
    out = []
    for r0, r1 in batches(n_rows, batch_size):
        sources_done: dict[tuple[str, int], bool] = {}
        for kind, sample, label in keys:
            stored = [(sid, e) for sid, e in groups.get((kind, sample, label), []) if _overlaps(e.rows, r0, r1)]
            digest = pairs_digest(sample, r0, r1) if kind == "resample" else None
            # Shards written before pairs were recorded are taken as valid when their batch matches.
            valid = all(e.rows == (r0, r1) and (digest is None or e.pairs_sha in (None, digest))
                        and _same_top(e, manifest, top_digest) and sid not in damaged
                        for sid, e in stored)
            have = {u.label: u for _, e in stored for u in _units(manifest, e)}
            want = asked if (kind, sample) in asked_draws and label == cond_label else {}
            # The batch's resample pairs are stored once per draw, by a valid shard of any condition.
            draw_shards = [(sid, e) for g, lst in groups.items() if g[:2] == (kind, sample)
                           for sid, e in lst if _overlaps(e.rows, r0, r1)]
            if valid:
                need, supersedes = {k: u for k, u in want.items() if k not in have}, []
                with_tokens = label != "" and not any(e.holds("condition_tokens") for _, e in stored)
            else:
                need, supersedes = have | want, [sid for sid, _ in stored]
                if label == "":  # its extra neuron detail goes with it (redone after this phase if still wanted)
                    supersedes += [sid for sid, e in detail.get((kind, sample), []) if _overlaps(e.rows, r0, r1)]
                with_tokens = label != ""
            if not need:
                continue
            held = any(e.holds("resample_sources") for sid, e in draw_shards if sid not in supersedes
                       and not _superseded(out, sid))
            with_sources = kind == "resample" and not held and not sources_done.get((kind, sample))
            sources_done[(kind, sample)] = sources_done.get((kind, sample), False) or with_sources
            units = sorted(need.values(), key=unit_order)
            spec = units_spec(units)
            shard_id = _new_id(taken, "abl", kind, sample, r0, r1, f"{spec}|{label}" if label else spec)
            out.append(AblationWork(kind, sample, (r0, r1), units, spec, shard_id, supersedes, with_sources,
                                    conditions.get(label), with_tokens))
    return out


def _superseded(out: list[AblationWork], sid: str) -> bool:
    return any(sid in w.supersedes for w in out)


def _as_unit(x) -> Unit:
    return x if isinstance(x, Unit) else head_unit(*x)


def _by_draw(manifest: Manifest, phase: str) -> dict[tuple[str, int], list[tuple[str, ShardEntry]]]:
    out: dict[tuple[str, int], list[tuple[str, ShardEntry]]] = {}
    for sid, e in manifest.shards.items():
        if e.phase == phase:
            out.setdefault(e.draw, []).append((sid, e))
    return out


def _by_group(manifest: Manifest, phase: str) -> dict[tuple[str, int, str], list[tuple[str, ShardEntry]]]:
    """Shards of one phase by (ablation, sample, condition label)."""
    n_layers, n_heads = manifest.model.n_layers, manifest.model.n_heads
    out: dict[tuple[str, int, str], list[tuple[str, ShardEntry]]] = {}
    for sid, e in manifest.shards.items():
        if e.phase == phase:
            out.setdefault((*e.draw, e.condition_label(n_layers, n_heads)), []).append((sid, e))
    return out


def _new_id(taken: set, prefix: str, kind: str, sample: int, r0: int, r1: int, spec: str) -> str:
    """A shard id not in `taken` (then added to it)."""
    key = hashlib.sha256(spec.encode()).hexdigest()[:8]
    base = f"{prefix}-{kind}-s{sample}-{r0:08d}-{r1:08d}-h{key}"
    shard_id, n = base, 1
    while shard_id in taken:
        n += 1
        shard_id = f"{base}-v{n}"
    taken.add(shard_id)
    return shard_id


def stored_heads(manifest: Manifest, e: ShardEntry) -> set[tuple[int, int]]:
    """The (layer, head) of a shard's unconditioned head units (what the per-head neuron phase reads)."""
    if _condition(manifest, e) is not None:
        return set()
    return {(u.layer, u.head) for u in _units(manifest, e) if u.kind == "head"}


def complete_heads(manifest: Manifest, n_rows: int, batch_size: int, kind: str, sample: int) -> set[tuple[int, int]]:
    """Heads whose ablation shards of one draw cover every batch of `n_rows` rows exactly (sr_mlps needs all tokens)."""
    per_batch: dict[tuple[int, int], set] = {}
    for _, e in _by_draw(manifest, "ablation").get((kind, sample), []):
        per_batch.setdefault(e.rows, set()).update(stored_heads(manifest, e))
    out = None
    for rows in batches(n_rows, batch_size):
        have = per_batch.get(rows, set())
        out = have if out is None else out & have
    return out or set()


def neuron_work(manifest: Manifest, n_rows: int, batch_size: int,
                wanted: Callable[[str, int, int, int], set],
                digest: Callable[[str, int, int, int, Heads], str], *,
                damaged=frozenset()) -> list[AblationWork]:
    """The `neurons` shards a run must write (extra neuron detail of `--sr-mlps-neurons`), batch by batch.

    Args:
        manifest: the store's snapshot (after the ablation phase).
        n_rows, batch_size: the run's rows and batch size.
        wanted: (kind, sample, r0, r1) -> heads with extra detail tokens in that batch now.
        digest: (kind, sample, r0, r1, heads) -> digest of those heads' extra tokens in the batch now
            (empty for a head without any).
        damaged: shard ids whose files are missing or damaged: redone.

    Returns:
        Work in batch order, then draw order; a stale shard is superseded by one covering its heads
        too (possibly with no rows left), so its rows never outlive the token sets they were for.
    """
    n_layers, n_heads = manifest.model.n_layers, manifest.model.n_heads
    detail = _by_draw(manifest, NEURON_PHASE)
    draws = sorted(set(stored_draws(manifest)) | set(detail), key=_draw_order)
    taken = set(manifest.shards)
    out = []
    for r0, r1 in batches(n_rows, batch_size):
        for kind, sample in draws:
            stored = [(sid, e) for sid, e in detail.get((kind, sample), []) if _overlaps(e.rows, r0, r1)]
            heads_of = {sid: sorted(stored_heads(manifest, e)) for sid, e in stored}
            valid = all(e.rows == (r0, r1) and sid not in damaged
                        and e.detail_sha == digest(kind, sample, r0, r1, heads_of[sid]) for sid, e in stored)
            have = {h for hs in heads_of.values() for h in hs}
            want = set(wanted(kind, sample, r0, r1))
            need, supersedes = (want - have, []) if valid else (want | have, [sid for sid, _ in stored])
            if not need:
                continue
            heads = sorted(need)
            shard_id = _new_id(taken, "nrn", kind, sample, r0, r1, heads_spec(heads, n_layers, n_heads))
            units = [head_unit(*h) for h in heads]
            out.append(AblationWork(kind, sample, (r0, r1), units, units_spec(units), shard_id, supersedes))
    return out
