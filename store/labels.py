"""Unit labels: the one parser for every place a user names what is ablated (CLI, store, SQL, pages).

Grammar (DESIGN.md, "Beyond single heads"), upper or lower case, ASCII digits only:

- `L9H6` one head (layer 9, head 6);
- `L9H6+L9H9+L10H0` a group of heads (any layers), written canonically in (layer, head) order;
- `ATTN9` every head of layer 9; `MLP9` layer 9's MLP; `BLOCK9` both.

A `--units` list adds shorthands that expand to several units (`heads` or `all`: every head;
`mlps`, `attn`, `blocks`: one unit per layer; `L9`: the heads of layer 9) and names for
groups (`backup=L9H6+L9H9`: the name is the unit's label everywhere). A shard records its
units as this text, so the store knows what is stored without the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from selfrepair.errors import ConfigError

UNIT_KINDS = ("head", "group", "attn", "mlp", "block")
# Shorthands of a `--units` list and the kind of the units each expands to (one per head or layer).
SHORTHANDS = {"heads": "head", "all": "head", "mlps": "mlp", "attn": "attn", "blocks": "block"}
_LAYER_KINDS = {"ATTN": "attn", "MLP": "mlp", "BLOCK": "block"}
_PREFIX = {kind: prefix for prefix, kind in _LAYER_KINDS.items()}
# `re.ASCII` and [0-9]: a label is plain text a shell and a URL keep as typed (no other scripts' digits).
_FLAGS = re.IGNORECASE | re.ASCII
_HEAD = re.compile(r"L([0-9]+)H([0-9]+)", _FLAGS)
_LAYER = re.compile(r"L([0-9]+)", _FLAGS)
_LAYER_UNIT = re.compile(r"(ATTN|MLP|BLOCK)([0-9]+)", _FLAGS)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,63}", re.ASCII)
_ADVICE = "use labels like L9H6, L9H6+L9H9, ATTN9, MLP9, BLOCK9"
_LIST_ADVICE = "use heads, mlps, attn, blocks, L9 or labels like L9H6, L9H6+L9H9, ATTN9, MLP9, BLOCK9, name=L9H6+L9H9"


@dataclass(frozen=True)
class Unit:
    """What one ablation replaces. `layer` is the first layer it touches; `head` is set for a head only.

    Args:
        kind: one of UNIT_KINDS.
        layer: the head's, the layer unit's, or a group's first layer.
        head: the head index of a `head` unit, else -1 (the store's `head` column).
        members: a group's heads in (layer, head) order; empty for other kinds.
        name: a group's user-given name, else "".
    """

    kind: str
    layer: int
    head: int = -1
    members: tuple[tuple[int, int], ...] = ()
    name: str = ""

    @property
    def canonical(self) -> str:
        """The unit written in the grammar, whatever its name (`L9H6+L9H9`, `MLP9`)."""
        if self.kind == "head":
            return head_label(self.layer, self.head)
        if self.kind == "group":
            return "+".join(head_label(l, h) for l, h in self.members)
        return f"{_PREFIX[self.kind]}{self.layer}"

    @property
    def label(self) -> str:
        """What every page and query shows: the name of a named group, else the canonical label."""
        return self.name or self.canonical

    @property
    def spec(self) -> str:
        """The unit as a `--units` item (`name=L9H6+L9H9` for a named group), as a shard records it."""
        return f"{self.name}={self.canonical}" if self.name else self.canonical

    def heads(self, n_heads: int) -> tuple[tuple[int, int], ...]:
        """The (layer, head) pairs whose z the unit replaces."""
        if self.kind == "head":
            return ((self.layer, self.head),)
        if self.kind == "group":
            return self.members
        if self.kind in ("attn", "block"):
            return tuple((self.layer, h) for h in range(n_heads))
        return ()

    def mlps(self) -> tuple[int, ...]:
        """The layers whose MLP write the unit replaces."""
        return (self.layer,) if self.kind in ("mlp", "block") else ()

    def last_layer(self) -> int:
        return max(l for l, _ in self.members) if self.kind == "group" else self.layer

    def overlaps(self, other: Unit, n_heads: int) -> bool:
        """Whether the two units replace a component in common."""
        return bool(set(self.heads(n_heads)) & set(other.heads(n_heads)) or set(self.mlps()) & set(other.mlps()))

    def __str__(self) -> str:
        return self.label


def head_label(layer: int, head: int) -> str:
    """`L{layer}H{head}`, the project's head label."""
    return f"L{int(layer)}H{int(head)}"


def head_unit(layer: int, head: int) -> Unit:
    return Unit("head", int(layer), int(head))


def parse_unit(text: str, n_layers: int | None = None, n_heads: int | None = None) -> Unit:
    """One unit label (no shorthand, no name); with the model's sizes, also refuse one outside the model.

    Raises:
        ConfigError: `cannot parse 'X'`, an empty group or a repeated head in one, or out of range
            (`MLP99 is out of range; the model has layers 0..29`).
    """
    raw = str(text).strip()
    m = _LAYER_UNIT.fullmatch(raw)
    if m:
        unit = Unit(_LAYER_KINDS[m.group(1).upper()], int(m.group(2)))
    elif "+" in raw:
        parts = [p.strip() for p in raw.split("+")]
        if not any(parts):
            raise ConfigError(f"{raw!r} is an empty group; write its heads like L9H6+L9H9")
        heads = []
        for part in parts:
            h = _HEAD.fullmatch(part)
            if h is None:
                what = "an empty member" if not part else repr(part)
                raise ConfigError(f"group {raw!r} has {what}: a group joins heads like L9H6+L9H9")
            heads.append((int(h.group(1)), int(h.group(2))))
        repeated = sorted({x for x in heads if heads.count(x) > 1})
        if repeated:
            raise ConfigError(f"group {raw!r} names {head_label(*repeated[0])} twice")
        unit = Unit("group", min(heads)[0], members=tuple(sorted(heads))) if len(heads) > 1 else head_unit(*heads[0])
    else:
        h = _HEAD.fullmatch(raw)
        if h is None:
            raise ConfigError(f"cannot parse {raw!r}")
        unit = head_unit(int(h.group(1)), int(h.group(2)))
    _check_range(unit, raw, n_layers, n_heads)
    return unit


def parse_units(spec: str, n_layers: int | None = None, n_heads: int | None = None, flag: str | None = "--units"
                ) -> list[Unit]:
    """A `--units` list: labels, shorthands (`heads`, `all`, `mlps`, `attn`, `blocks`, `L9`) and named groups.

    Shorthands need the model's sizes. Units come back in order of first mention, each once.

    Raises:
        ConfigError: `--units: …` for anything `parse_unit` refuses, an unknown word, an empty item,
            a name used twice or a name that is itself a label.
    """
    out: dict[str, Unit] = {}
    names: dict[str, str] = {}
    items = [p.strip() for p in str(spec).split(",")]
    if not any(items):
        raise ConfigError(f"{flag + ': ' if flag else ''}no unit given; {_LIST_ADVICE}")
    for item in items:
        try:
            for unit in _expand(item, n_layers, n_heads):
                if unit.name:
                    if unit.name.lower() in names:
                        raise ConfigError(f"the name {unit.name!r} is used twice")
                    names[unit.name.lower()] = unit.canonical
                out.setdefault(unit.label, unit)
        except ConfigError as e:
            advice = f"; {_LIST_ADVICE}" if str(e).startswith("cannot parse") else ""
            raise ConfigError(f"{flag + ': ' if flag else ''}{e}{advice}") from None
    named = {u.canonical for u in out.values() if u.name}
    return [u for u in out.values() if u.name or u.canonical not in named or u.kind != "group"]


def normalize_units(spec: str) -> str:
    """A `--units` value checked without the model (ranges are checked once its sizes are known), in
    canonical text: shorthands in lower case, layers and labels in upper case, groups in (layer, head) order.

    Raises:
        ConfigError: as `parse_units`, for anything but a range.
    """
    items = []
    for item in (p.strip() for p in str(spec).split(",")):
        word = item.lower()
        if word in SHORTHANDS:
            items.append(word)
        elif _LAYER.fullmatch(item):
            items.append(item.upper())
        else:
            items.append(item)
    rest = [i for i in items if i not in SHORTHANDS and not _LAYER.fullmatch(i)]
    units = parse_units(",".join(rest), flag=None) if rest else []
    canon = {u.canonical: u.spec for u in units} | {u.spec: u.spec for u in units}
    out = []
    for item in items:
        if item in SHORTHANDS or _LAYER.fullmatch(item):
            out.append(item)
            continue
        head, _, tail = item.partition("=")
        key = f"{head.strip()}={parse_unit(tail).canonical}" if tail else parse_unit(item).canonical
        out.append(canon.get(key, key))
    return ",".join(dict.fromkeys(out))


def normalize_conditions(values) -> tuple[str, ...]:
    """`--given` values (one unit each, a group may be named), checked and canonical, each once."""
    values = (values,) if isinstance(values, str) else tuple(values)
    out = []
    for value in values:
        units = parse_units(value, flag=None)
        if len(units) != 1 or "," in str(value):
            raise ConfigError(f"--given takes one unit, got {value!r}; repeat --given for several conditions")
        out.append(units[0].spec)
    return tuple(dict.fromkeys(out))


def units_spec(units: list[Unit]) -> str:
    """The text a shard records for its units (`parse_units` reads it back, the same units in order)."""
    return ",".join(u.spec for u in units)


def is_shorthand(item: str) -> bool:
    """Whether a `--units` item is a shorthand for several units (`heads`, `mlps`, `L9`, …)."""
    item = str(item).strip()
    return item.lower() in SHORTHANDS or bool(_LAYER.fullmatch(item))


def is_label(text: str) -> bool:
    """Whether `text` parses as a unit label or a `--units` shorthand (a name may be neither)."""
    raw = str(text).strip()
    if raw.lower() in SHORTHANDS or _LAYER.fullmatch(raw):
        return True
    try:
        parse_unit(raw)
    except ConfigError:
        return False
    return True


def _expand(item: str, n_layers: int | None, n_heads: int | None) -> list[Unit]:
    """One `--units` item as units."""
    if not item:
        raise ConfigError(f"an empty item; {_LIST_ADVICE}")
    word = item.lower()
    if word in SHORTHANDS or _LAYER.fullmatch(item):
        if n_layers is None or n_heads is None:
            raise ConfigError(f"{item!r} needs the model's sizes")
        if _LAYER.fullmatch(item):
            layer = int(_LAYER.fullmatch(item).group(1))
            _check_range(Unit("attn", layer), item, n_layers, n_heads)
            return [head_unit(layer, h) for h in range(n_heads)]
        kind = SHORTHANDS[word]
        if kind == "head":
            return [head_unit(l, h) for l in range(n_layers) for h in range(n_heads)]
        return [Unit(kind, l) for l in range(n_layers)]
    if "=" in item:
        name, _, label = (p.strip() for p in item.partition("="))
        if not _NAME.fullmatch(name):
            raise ConfigError(f"{name!r} is not a name: use letters, digits, '_' and '-', starting with a letter")
        if is_label(name):
            raise ConfigError(f"the name {name!r} is also a label; choose another")
        unit = parse_unit(label, n_layers, n_heads)
        if unit.kind != "group":
            raise ConfigError(f"only a group of heads can be named ({name}={label})")
        return [Unit("group", unit.layer, members=unit.members, name=name)]
    return [parse_unit(item, n_layers, n_heads)]


def _check_range(unit: Unit, text: str, n_layers: int | None, n_heads: int | None) -> None:
    """ConfigError when the model's sizes are known and `unit` lies outside them."""
    layers = [l for l, _ in unit.members] if unit.kind == "group" else [unit.layer]
    heads = [h for _, h in unit.members] if unit.kind == "group" else [unit.head]
    if n_layers is not None and max(layers) >= n_layers:
        raise ConfigError(f"{text} is out of range; the model has layers 0..{n_layers - 1}")
    if n_heads is not None and max(heads) >= n_heads:
        raise ConfigError(f"{text} is out of range; the model has heads 0..{n_heads - 1}")


# -- head labels (`L9H11`, `L9`): the head-only callers of the same grammar -------------------

class Label(NamedTuple):
    """One parsed head label: a head (`head` set) or a whole layer's heads (`head` None)."""

    layer: int
    head: int | None

    def heads(self, n_heads: int) -> list[tuple[int, int]]:
        """The (layer, head) pairs the label names."""
        return [(self.layer, self.head)] if self.head is not None else [(self.layer, h) for h in range(n_heads)]

    def __str__(self) -> str:
        return f"L{self.layer}" if self.head is None else head_label(self.layer, self.head)


def parse_label(text: str, n_layers: int | None = None, n_heads: int | None = None) -> Label:
    """Parse `L9H11` or `L9`; with the model's sizes, also refuse one outside the model.

    Raises:
        ConfigError: `cannot parse 'X'` (callers add what to write instead), or
            `L9H0 is out of range; the model has layers 0..1` (or `heads 0..3`).
    """
    raw = str(text).strip()
    m = _LAYER.fullmatch(raw)
    if m:
        _check_range(Unit("attn", int(m.group(1))), raw, n_layers, n_heads)
        return Label(int(m.group(1)), None)
    if _HEAD.fullmatch(raw) is None:
        raise ConfigError(f"cannot parse {raw!r}")
    unit = parse_unit(raw, n_layers, n_heads)
    return Label(unit.layer, unit.head)


def parse_head(text: str, n_layers: int | None = None, n_heads: int | None = None) -> tuple[int, int]:
    """One head's label (`L9H11` -> (9, 11)); a bare layer or another unit is refused.

    Raises:
        ConfigError: `'X' is not a head label like L9H11`, or out of range (see `parse_unit`).
    """
    if _HEAD.fullmatch(str(text).strip()) is None:
        raise ConfigError(f"{str(text).strip()!r} is not a head label like L9H11")
    unit = parse_unit(text, n_layers, n_heads)
    return unit.layer, unit.head
