"""The units and conditions a model's store holds, from the `unit_catalog` named query.

`StoredUnits` resolves what a user typed (`MLP9`, `L9H6+L9H9` or a group's name, any case)
to the stored `Unit` through the one label parser (`store/labels.parse_unit`), and refuses
anything not stored with one line that lists what is (abbreviated: `heads all (12)`,
`MLP0..2`), as `queries/requests.check` does for heads. `selfrepair head`, `info`, `query`
and the report read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from selfrepair.errors import ConfigError, QueryError
from selfrepair.queries import requests
from selfrepair.store.heads import heads_spec
from selfrepair.store.labels import Unit, parse_unit

# What a kind is called in running text, singular and plural.
KIND_WORDS = {"head": ("head", "heads"), "group": ("group", "groups"), "attn": ("attention layer", "attention layers"),
              "mlp": ("MLP", "MLPs"), "block": ("block", "blocks")}
LAYER_KINDS = ("attn", "mlp", "block")
GROUPS_SHOWN = 6  # groups listed by name in a refusal; the rest counted
_PREFIX = {"attn": "ATTN", "mlp": "MLP", "block": "BLOCK"}
_ADVICE = "use a label like L26H6 (layer 26, head 6), L26H6+L26H9, ATTN26, MLP26, BLOCK26 or a stored group's name"


def describe_kind(kind: str, n: int) -> str:
    """`3 MLPs`, `1 attention layer`."""
    return f"{n} {KIND_WORDS[kind][n != 1]}"


def layer_runs(layers) -> str:
    """Sorted layers as runs: `0..2,5,7..9`."""
    layers = sorted(set(layers))
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ",".join(str(a) if a == b else f"{a}..{b}" for a, b in runs)


def group_text(unit: Unit) -> str:
    """A group as a line shows it: `backup=L9H6+L9H9`, or its canonical label when unnamed."""
    return unit.spec


@dataclass(frozen=True)
class StoredUnits:
    """One model's stored units.

    Args:
        model: the model folder's name.
        n_layers, n_heads: the model's shape.
        units: label -> Unit, every stored unit and condition.
        rows: (ablation, sample, condition label, unit label) of every stored unit, in catalog order.
    """

    model: str
    n_layers: int
    n_heads: int
    units: dict[str, Unit]
    rows: tuple[tuple[str, int, str, str], ...]

    @classmethod
    def of(cls, store, model: str) -> "StoredUnits":
        """Read a model's catalog from an open `Store`."""
        info = store.manifest(model).model
        cat = store.query("unit_catalog").filter(pl.col("model") == model)
        units: dict[str, Unit] = {}
        for r in cat.iter_rows(named=True):
            units.setdefault(r["unit"], _unit(r["unit"], r["unit_kind"], r["members"]))
            if r["condition"]:
                units.setdefault(r["condition"], _unit(r["condition"], r["condition_kind"], r["condition_members"]))
        rows = tuple((r["ablation"], r["sample"], r["condition"], r["unit"]) for r in cat.iter_rows(named=True))
        return cls(model, info.n_layers, info.n_heads, units, rows)

    # -- what is stored ---------------------------------------------------------------------
    def draw_units(self, ablation: str, sample: int, condition: str = "") -> list[Unit]:
        """The units stored for a draw under a condition ("" none), in catalog order."""
        return [self.units[u] for a, s, c, u in self.rows if (a, s, c) == (ablation, sample, condition)]

    def conditions(self, ablation: str | None = None, sample: int | None = None) -> list[Unit]:
        """The stored conditions (of one draw when given), each once, in catalog order."""
        labels = [c for a, s, c, _ in self.rows if c and ablation in (None, a) and sample in (None, s)]
        return [self.units[c] for c in dict.fromkeys(labels)]

    def kinds(self, ablation: str | None = None, sample: int | None = None, condition: str = "") -> dict[str, int]:
        """Unit count per kind (in UNIT order: head, group, attn, mlp, block) for the draw, or over all draws."""
        labels = {u for a, s, c, u in self.rows if c == condition and ablation in (None, a) and sample in (None, s)}
        out: dict[str, int] = {}
        for kind in KIND_WORDS:
            n = sum(self.units[u].kind == kind for u in labels)
            if n:
                out[kind] = n
        return out

    def summary(self, units: list[Unit], names: bool = False) -> str:
        """Units abbreviated: `heads all (12), group bk=L1H0+L2H1, ATTN0..2, MLP0..2, BLOCK0..2`
        (names: a group by its label alone, `group bk`)."""
        parts = []
        heads = [(u.layer, u.head) for u in units if u.kind == "head"]
        if heads:
            parts.append(f"heads {heads_spec(heads, self.n_layers, self.n_heads)} ({len(heads)})")
        groups = [u for u in units if u.kind == "group"]
        if groups:
            shown = ", ".join(g.label if names else group_text(g) for g in groups[:GROUPS_SHOWN])
            more = f" and {len(groups) - GROUPS_SHOWN} more" if len(groups) > GROUPS_SHOWN else ""
            parts.append(f"{KIND_WORDS['group'][len(groups) != 1]} {shown}{more}")
        for kind in LAYER_KINDS:
            layers = [u.layer for u in units if u.kind == kind]
            if layers:
                parts.append(",".join(f"{_PREFIX[kind]}{run}" for run in layer_runs(layers).split(",")))
        return ", ".join(parts) or "none"

    # -- resolving what a user typed -----------------------------------------------------------
    def resolve(self, text: str, what: str = "head") -> Unit:
        """The stored unit a label or group name names (a label not stored comes back as parsed).

        Args:
            text: `MLP9`, `L9H6`, `L9H6+L9H9` (any order or case) or a stored group's name.
            what: how a refusal names the text (`head` keeps the head page's message).

        Raises:
            QueryError: text that is neither a label nor a stored group's name, or a unit outside the model.
        """
        raw = str(text).strip()
        by_name = {u.name.lower(): u for u in self.units.values() if u.name}
        if raw.lower() in by_name:
            return by_name[raw.lower()]
        try:
            unit = parse_unit(raw, self.n_layers, self.n_heads)
        except ConfigError as e:
            if str(e).startswith(("cannot parse", "group")) or "empty" in str(e):
                names = ", ".join(sorted(u.name for u in self.units.values() if u.name))
                stored = f" (stored groups: {names})" if names else ""
                raise QueryError(f"{what} {raw!r}: {_ADVICE}{stored}") from None
            raise QueryError(f"{e}; stored units of {self.model}: {self.summary(self._all_units())}") from None
        stored = next((u for u in self.units.values() if u.canonical == unit.canonical), None)
        return stored or unit

    def check(self, unit: Unit, condition: Unit | None, ablation: str, sample: int) -> None:
        """Refuse, naming what is stored, a unit or condition with no stored rows for the draw.

        Raises:
            QueryError: `MLP9 is not stored for gpt2 (resample draw 0); stored units: …`.
        """
        draw = f"{ablation} draw {sample}"
        if condition is not None:
            conds = self.conditions(ablation, sample)
            if condition.label not in {c.label for c in conds}:
                have = ", ".join(c.spec for c in conds) or "none (ingest with --given)"
                raise QueryError(f"condition {condition.label} is not stored for {self.model} ({draw}); "
                                 f"stored conditions: {have}")
        cond = condition.label if condition is not None else ""
        stored = self.draw_units(ablation, sample, cond)
        if unit.label not in {u.label for u in stored}:
            given = f" given {cond}" if cond else ""
            where = f"stored under {cond}" if cond else "stored units"
            raise QueryError(f"{unit.label}{given} is not stored for {self.model} ({draw}); "
                             f"{where}: {self.summary(stored)}")

    def _all_units(self) -> list[Unit]:
        labels = dict.fromkeys(u for _, _, c, u in self.rows if not c)
        return [self.units[u] for u in labels]


def _unit(label: str, kind: str, members: str | None) -> Unit:
    """A catalog row's Unit: parsed from its label, a group from its members (its name when it has one)."""
    if kind == "group":
        unit = parse_unit(members)
        return unit if label == unit.canonical else Unit("group", unit.layer, members=unit.members, name=label)
    return parse_unit(label)


def info_lines(inv, stored: StoredUnits) -> list[str]:
    """`selfrepair info`'s text for one model: the inventory's lines, each draw's units besides its heads
    (counts per kind, then the units abbreviated) and those under each condition, the named groups with
    their members and the conditions. A store of heads alone reads as before units.

    Args:
        inv: the model's `Inventory`.
        stored: the model's `StoredUnits`.
    """
    lines = inv.lines()
    out = [lines[0]]
    for d in inv.draws:
        heads = f"heads {inv.heads_text(d)} ({len(d.heads)})" if d.heads else "no heads"
        out.append(f"  {d.ablation:<8} draw {d.sample}: {heads}, {d.batches} batches")
        others = [u for u in stored.draw_units(d.ablation, d.sample) if u.kind != "head"]
        if others:
            out.append(f"           other units: {_counts(others)} ({stored.summary(others, names=True)})")
        for cond in stored.conditions(d.ablation, d.sample):
            units = stored.draw_units(d.ablation, d.sample, cond.label)
            out.append(f"           given {cond.label}: {_counts(units)} ({stored.summary(units, names=True)})")
    if not inv.draws:
        out.append("  no ablation stored yet")
    groups = [u for u in stored.units.values() if u.kind == "group"]
    if groups:
        out.append("  groups: " + ", ".join(f"{u.label} = {u.canonical}" if u.name else u.canonical for u in groups))
    conds = stored.conditions()
    if conds:
        out.append("  conditions: " + ", ".join(
            f"{c.label} ({KIND_WORDS[c.kind][0]}{' ' + c.canonical if c.name else ''})"
            for c in conds))
    out.append(lines[-1])
    return out


def _counts(units: list[Unit]) -> str:
    """`11 heads, 1 group, 3 MLPs`."""
    kinds = [u.kind for u in units]
    return ", ".join(describe_kind(k, kinds.count(k)) for k in KIND_WORDS if k in kinds)


def unit_params(store, query, params: dict) -> dict:
    """A named query's `unit` and `condition` values as the store labels them (a group's canonical label
    becomes its name), refused with one line listing what is stored when no model holds them.

    Args:
        store: an open `Store`.
        query: the `NamedQuery`.
        params: the values given (strings from the command line); others pass through.

    Raises:
        QueryError: a unit or condition that no model of the store holds for the draw asked.
    """
    known = {p.name: p for p in query.params}
    if "unit" not in known or "unit" not in params:
        return params
    bound = query.bind(params)
    requests.check(store.inventories, bound)  # an ablation, draw or p not stored: its own message first
    ablation, sample = bound.get("ablation"), bound.get("sample", 0)
    given = bound.get("condition", "none")
    given = None if str(given) in ("", "none") else str(given)
    problems = []
    for model in store.models:
        stored = StoredUnits.of(store, model)
        try:
            unit = stored.resolve(str(params["unit"]), what="unit")
            condition = stored.resolve(given, what="condition") if given is not None else None
            if ablation is not None:
                stored.check(unit, condition, ablation, sample)
        except QueryError as e:
            problems.append(str(e))
            continue
        out = dict(params) | {"unit": unit.label}
        return out | ({"condition": condition.label} if condition is not None else {})
    raise QueryError(problems[0] if len(problems) == 1 else "; ".join(problems))
