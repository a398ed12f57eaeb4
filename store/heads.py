"""Head sets as text: `all`, or labels like `L9H11,L10` (a bare layer is all its heads).

A shard records the exact heads it ablated in this form, so the store can tell which
(head, batch) units are already there without the model.
"""

from __future__ import annotations

from selfrepair.errors import ConfigError
from selfrepair.store.labels import parse_label

HEAD_WORDS = ("all",)
SR_WORDS = ("none", "all", "penultimate")
_ADVICE = {HEAD_WORDS: "'all' or labels like L9H11,L10", SR_WORDS: "none, all, penultimate or labels like L10H3,L11"}


def normalize_spec(spec: str, words: tuple[str, ...] = HEAD_WORDS) -> str:
    """The canonical text of a `--heads` (or, with SR_WORDS, `--sr-mlps-neurons`) value, checked
    without the model: one of `words` in lower case, or upper-case labels (ranges are checked later).

    Raises:
        ConfigError: `cannot parse 'X'; use …`.
    """
    word = str(spec).strip().lower()
    if word in words:
        return word
    parts = [p.strip() for p in str(spec).split(",")]
    for part in parts:
        try:
            parse_label(part)
        except ConfigError as e:
            raise ConfigError(f"{e}; use {_ADVICE[words]}") from None
    return ",".join(p.upper() for p in parts)


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
    for part in spec.split(","):
        try:
            out.update(parse_label(part, n_layers, n_heads).heads(n_heads))
        except ConfigError as e:
            advice = f"; use {_ADVICE[HEAD_WORDS]}" if str(e).startswith("cannot parse") else ""
            raise ConfigError(f"--heads: {e}{advice}") from None
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
