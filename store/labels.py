"""Component labels: the one parser for every place a user names heads (CLI, queries, pages).

Grammar today: `L9H11` one head (layer 9, head 11) and `L9` every head of layer 9, upper or
lower case, ASCII digits only. DESIGN.md "Beyond single heads" adds units next (`L9H6+L9H9`,
`ATTN9`, `MLP9`, `BLOCK9`): they become more kinds of `Label` and more alternatives of
`_LABEL`, parsed here and nowhere else.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from selfrepair.errors import ConfigError

# `re.ASCII` and [0-9]: a label is plain text a shell and a URL keep as typed (no other scripts' digits).
_LABEL = re.compile(r"L([0-9]+)(?:H([0-9]+))?", re.IGNORECASE | re.ASCII)


class Label(NamedTuple):
    """One parsed label: a head (`head` set) or a whole layer's heads (`head` None)."""

    layer: int
    head: int | None

    def heads(self, n_heads: int) -> list[tuple[int, int]]:
        """The (layer, head) pairs the label names."""
        return [(self.layer, self.head)] if self.head is not None else [(self.layer, h) for h in range(n_heads)]

    def __str__(self) -> str:
        return f"L{self.layer}" if self.head is None else head_label(self.layer, self.head)


def head_label(layer: int, head: int) -> str:
    """`L{layer}H{head}`, the project's head label."""
    return f"L{int(layer)}H{int(head)}"


def parse_label(text: str, n_layers: int | None = None, n_heads: int | None = None) -> Label:
    """Parse one label; with the model's sizes, also refuse one outside the model.

    Raises:
        ConfigError: `cannot parse 'X'` (callers add what to write instead), or
            `L9H0 is out of range; the model has layers 0..1` (or `heads 0..3`).
    """
    label = _match(text)
    if label is None:
        raise ConfigError(f"cannot parse {str(text).strip()!r}")
    return _in_model(label, text, n_layers, n_heads)


def parse_head(text: str, n_layers: int | None = None, n_heads: int | None = None) -> tuple[int, int]:
    """One head's label (`L9H11` -> (9, 11)); a bare layer is refused.

    Raises:
        ConfigError: `'X' is not a head label like L9H11`, or out of range (see `parse_label`).
    """
    label = _match(text)
    if label is None or label.head is None:
        raise ConfigError(f"{str(text).strip()!r} is not a head label like L9H11")
    return tuple(_in_model(label, text, n_layers, n_heads))


def _match(text: str) -> Label | None:
    m = _LABEL.fullmatch(str(text).strip())
    return None if m is None else Label(int(m.group(1)), None if m.group(2) is None else int(m.group(2)))


def _in_model(label: Label, text: str, n_layers: int | None, n_heads: int | None) -> Label:
    """`label`, or ConfigError when the model's sizes are known and it lies outside them."""
    if n_layers is not None and label.layer >= n_layers:
        raise ConfigError(f"{str(text).strip()} is out of range; the model has layers 0..{n_layers - 1}")
    if n_heads is not None and label.head is not None and label.head >= n_heads:
        raise ConfigError(f"{str(text).strip()} is out of range; the model has heads 0..{n_heads - 1}")
    return label
