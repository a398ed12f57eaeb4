"""Head sets as text: `all`, or labels like `L9H11,L10` (a bare layer is all its heads).

A shard records the exact heads it ablated in this form, so the store can tell which
(head, batch) units are already there without the model.
"""

from __future__ import annotations

import re

from selfrepair.errors import ConfigError

_HEAD_RE = re.compile(r"^L([0-9]+)(?:H([0-9]+))?$", re.IGNORECASE)


def parse_heads(spec: str, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """Parse `all` or a list like `L9H11,L10` (a bare layer means all its heads).

    Args:
        spec: the `--heads` value.
        n_layers: the model's layer count (for range checks).
        n_heads: heads per layer.

    Returns:
        Sorted unique (layer, head) pairs.
    """
    if spec.strip().lower() == "all":
        return [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    out: set[tuple[int, int]] = set()
    for part in (p.strip() for p in spec.split(",")):
        m = _HEAD_RE.match(part)
        if not m:
            raise ConfigError(f"--heads: cannot parse {part!r}; use 'all' or labels like L9H11,L10")
        layer = int(m.group(1))
        if layer >= n_layers:
            raise ConfigError(f"--heads: {part} is out of range; the model has layers 0..{n_layers - 1}")
        if m.group(2) is None:
            out.update((layer, h) for h in range(n_heads))
            continue
        head = int(m.group(2))
        if head >= n_heads:
            raise ConfigError(f"--heads: {part} is out of range; the model has heads 0..{n_heads - 1}")
        out.add((layer, head))
    if not out:
        raise ConfigError("--heads: no head selected")
    return sorted(out)


def heads_spec(heads, n_layers: int, n_heads: int) -> str:
    """The shortest canonical text for a head set: `all`, whole layers as `L3`, others as `L3H1`."""
    chosen = set(heads)
    if len(chosen) == n_layers * n_heads:
        return "all"
    parts = []
    for layer in range(n_layers):
        in_layer = [h for h in range(n_heads) if (layer, h) in chosen]
        if len(in_layer) == n_heads:
            parts.append(f"L{layer}")
        else:
            parts += [f"L{layer}H{h}" for h in in_layer]
    return ",".join(parts)


SR_WORDS = ("none", "all", "penultimate")


def check_sr_heads_spec(spec: str) -> None:
    """Check the form of a `--sr-mlps-neurons` value without the model (ranges are checked later).

    Raises:
        ConfigError: neither `none`, `all`, `penultimate` nor head labels.
    """
    if spec.strip().lower() in SR_WORDS:
        return
    for part in (p.strip() for p in spec.split(",")):
        if not _HEAD_RE.match(part):
            raise ConfigError(f"cannot parse {part!r}; use none, all, penultimate or labels like L10H3,L11")


def parse_sr_heads(spec: str, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """The heads a `--sr-mlps-neurons` value names: `none`, `all`, `penultimate` (every head of
    layer n_layers − 2, as the paper's neuron figures) or labels parsed like `--heads`.

    Returns:
        Sorted unique (layer, head) pairs (empty for `none`).
    """
    word = spec.strip().lower()
    if word == "none":
        return []
    if word == "penultimate":
        if n_layers < 2:
            raise ConfigError(f"--sr-mlps-neurons penultimate: the model has {n_layers} layer(s), no layer n_layers - 2")
        return [(n_layers - 2, h) for h in range(n_heads)]
    try:
        return parse_heads(spec, n_layers, n_heads)
    except ConfigError as e:
        raise ConfigError(str(e).replace("--heads", "--sr-mlps-neurons", 1)) from None
