"""How much of its plan a model folder holds: the clean run's tokens and each draw's tokens per unit.

One function (`coverage`) reads the manifest's committed shards (the rows each one holds, for
which units, draw and condition) and the run's plan (token count, ablation kinds, resample
draws), so every reader can say when a store is partial and what is missing, in words:

    resample: 105 of 387 tokens; zero: 16 of 387 tokens

A store is partial when an ingest is unfinished (fewer clean tokens than planned, a planned
draw with nothing stored), or when a stored unit of some draw covers fewer tokens than the
store holds (ablation types or draws then cover different tokens, and heads fewer than the
plan). A unit never ablated in a draw is not partial: asking for it is refused outright
(queries/requests.py). Everything comes from the manifest (no table scan), so opening a
million-token store stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from selfrepair.store.manifest import Manifest
from selfrepair.store.schema import ABLATION_KINDS


@dataclass(frozen=True)
class DrawCoverage:
    """One (ablation, draw, condition) group of stored units and the tokens each covers.

    Args:
        ablation, sample: the draw.
        condition: the condition's label ("" for units ablated alone).
        tokens: unit label -> tokens its stored shards of this draw cover.
        planned: tokens every unit should cover (the store's token count).
    """

    ablation: str
    sample: int
    condition: str
    tokens: dict[str, int]
    planned: int
    several: bool = False  # the store holds several draws of this ablation: name the draw

    @property
    def name(self) -> str:
        """`resample`, `resample draw 1`, `zero given L0H1`: how the messages name the group."""
        out = f"{self.ablation} draw {self.sample}" if self.several or self.sample else self.ablation
        return out + (f" given {self.condition}" if self.condition else "")

    @property
    def short(self) -> dict[str, int]:
        """Units with fewer tokens than planned (all of them, as 0, when nothing is stored)."""
        return {u: n for u, n in self.tokens.items() if n < self.planned}

    @property
    def partial(self) -> bool:
        return not self.tokens or bool(self.short)

    def text(self) -> str:
        """`resample: 105 of 387 tokens`; `zero: 62 to 124 of 310 tokens (3 of 8 units short)` when units differ."""
        counts = sorted(set(self.tokens.values())) or [0]
        covered = f"{counts[0]:,}" if len(counts) == 1 else f"{counts[0]:,} to {counts[-1]:,}"
        out = f"{self.name}: {covered} of {self.planned:,} tokens"
        if len(counts) > 1:
            out += f" ({len(self.short)} of {len(self.tokens)} units short)"
        return out


@dataclass(frozen=True)
class Coverage:
    """One model folder's coverage of its plan.

    Args:
        model: the folder name.
        planned_tokens: the tokens the run stores when finished.
        clean_tokens: the tokens whose clean run is committed.
        draws: every planned or stored (ablation, draw, condition) group.
    """

    model: str
    planned_tokens: int
    clean_tokens: int
    draws: tuple[DrawCoverage, ...] = field(default=())

    @property
    def partial(self) -> bool:
        return self.clean_tokens < self.planned_tokens or any(d.partial for d in self.draws)

    def missing(self) -> list[str]:
        """What is missing, one phrase per short part: `clean run: 124 of 310 tokens`, `zero: 16 of 387 tokens`."""
        out = []
        if self.clean_tokens < self.planned_tokens:
            out.append(f"clean run: {self.clean_tokens:,} of {self.planned_tokens:,} tokens")
        out += [d.text() for d in self.draws if d.partial]
        return out

    def text(self) -> str:
        """One line: `tiny-gpt2 has resample: 124 of 310 tokens; zero: 62 of 310 tokens`, or ''."""
        return f"{self.model} has {'; '.join(self.missing())}" if self.partial else ""

    def lines(self) -> list[str]:
        """`selfrepair info`'s lines: `  partial: …` with the counts of every group, or nothing when complete."""
        if not self.partial:
            return []
        out = [f"  partial: {'; '.join(self.missing())}"]
        full = [d.name for d in self.draws if not d.partial]
        if full:
            out.append(f"           complete: {', '.join(full)} ({self.planned_tokens:,} tokens each)")
        return out


def _rows_covered(ranges) -> int:
    """Rows in the union of [r0, r1) ranges."""
    total, end = 0, 0
    for r0, r1 in sorted(ranges):
        if r1 > end:
            total += r1 - max(r0, end)
            end = r1
    return total


def planned_rows(manifest: Manifest) -> int:
    """The rows the run stores when finished: the manifest's count, set when the clean run ends; before
    that (a first ingest still in its clean run) the rows its `tokens` setting asks for."""
    stored = _rows_covered([e.rows for e in manifest.shards.values() if e.phase == "clean"])
    asked = 0
    if not manifest.n_rows:
        raw = manifest.config.raw
        tokens, seq_len = raw.get("tokens"), manifest.seq_len
        if isinstance(tokens, int) and seq_len > 1:
            # ingest/config.py IngestConfig.n_rows: whole rows of seq_len - 1 predictions (a paper-preset
            # run drops a partial last batch, so this may count one batch's rows more until the clean run ends).
            asked = -(-tokens // (seq_len - 1))
    return max(manifest.n_rows, stored, asked)


def _draw_keys(manifest: Manifest, ablation: str | None, sample: int) -> list[tuple[str, int]]:
    if ablation is not None:
        return [(ablation, sample)]
    # A shard holding several draws (written by hand, before draws were recorded): store/inventory.py's rule.
    return [(k, s) for k in manifest.ablation_kinds
            for s in (range(manifest.resample.samples) if k == "resample" else [0])]


def coverage(model: str, manifest: Manifest) -> Coverage:
    """What of its plan a model folder holds, from its manifest.

    Args:
        model: the folder name.
        manifest: its snapshot.

    Returns:
        The clean tokens against the planned ones, and per (ablation, draw, condition) the tokens
        each stored unit covers; planned draws with nothing stored have no units.
    """
    n_layers, n_heads = manifest.model.n_layers, manifest.model.n_heads
    rows = planned_rows(manifest)
    clean_rows = _rows_covered([e.rows for e in manifest.shards.values() if e.phase == "clean"])
    if manifest.n_rows and manifest.n_tokens:  # the stored count, once the clean run has ended
        per_row = manifest.n_tokens // manifest.n_rows
    elif manifest.seq_len > 1:  # during the first clean run: seq_len - 1 predictions per row
        per_row = manifest.seq_len - 1
    else:  # a store that never recorded either (synthetic): its tokens spread over its rows
        per_row = manifest.n_tokens // rows if rows else 0
    planned = max(rows * per_row, manifest.n_tokens)
    ranges: dict[tuple[str, int, str], dict[str, list]] = {}
    for e in manifest.shards.values():
        if e.phase != "ablation":
            continue
        cond = e.condition_label(n_layers, n_heads)
        for key in _draw_keys(manifest, e.ablation, e.sample):
            units = ranges.setdefault((*key, cond), {})
            for u in e.unit_list(n_layers, n_heads):
                units.setdefault(u.label, []).append(e.rows)
    if not ranges and manifest.compacted:
        # Rows written straight into compacted files, no shard entries (synthetic stores): complete by record.
        return Coverage(model, planned, planned)
    for kind in manifest.ablations:  # planned draws: every recorded kind and resample draw
        for sample in (range(manifest.resample.samples) if kind == "resample" else [0]):
            ranges.setdefault((kind, sample, ""), {})
    order = lambda k: (ABLATION_KINDS.index(k[0]) if k[0] in ABLATION_KINDS else len(ABLATION_KINDS), k[1], k[2])  # noqa: E731
    samples = {}
    for kind, sample, _ in ranges:
        samples.setdefault(kind, set()).add(sample)
    draws = tuple(DrawCoverage(kind, sample, cond, {u: min(_rows_covered(r) * per_row, planned) for u, r in units.items()},
                               planned, len(samples[kind]) > 1)
                  for (kind, sample, cond), units in sorted(ranges.items(), key=lambda kv: order(kv[0])))
    return Coverage(model, planned, min(clean_rows * per_row, planned), draws)
