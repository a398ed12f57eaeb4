"""The one label parser (store/labels.py) and the head specs built on it (store/heads.py)."""

from __future__ import annotations

import pytest

from selfrepair.errors import ConfigError
from selfrepair.store.heads import SR_WORDS, normalize_spec, parse_heads
from selfrepair.store.labels import Label, head_label, parse_head, parse_label


@pytest.mark.parametrize("text,want", [("L9H11", Label(9, 11)), ("l9h11", Label(9, 11)), (" L3 ", Label(3, None)),
                                       ("L0H0", Label(0, 0))])
def test_labels_parse_in_any_case(text, want):
    assert parse_label(text) == want
    assert str(want) == text.strip().upper()


@pytest.mark.parametrize("text", ["L٣H1", "L1H١", "L1X2", "1H2", "L", "LH1", "L1H", "L-1H2", "L1 H2", "ATTN9", ""])
def test_anything_else_is_refused(text):
    with pytest.raises(ConfigError, match="cannot parse"):
        parse_label(text)


def test_heads_outside_the_model_are_refused():
    assert parse_label("L1H3", n_layers=2, n_heads=4) == Label(1, 3)
    with pytest.raises(ConfigError, match=r"^L2H0 is out of range; the model has layers 0..1$"):
        parse_label("L2H0", n_layers=2, n_heads=4)
    with pytest.raises(ConfigError, match=r"^L1H4 is out of range; the model has heads 0..3$"):
        parse_head("L1H4", n_layers=2, n_heads=4)


def test_a_head_label_names_one_head():
    assert parse_head("l26h6") == (26, 6) and head_label(26, 6) == "L26H6"
    for text in ("L26", "26"):
        with pytest.raises(ConfigError, match=f"^'{text}' is not a head label like L9H11$"):
            parse_head(text)


def test_specs_use_the_same_parser():
    assert parse_heads("l1,L0H2", 2, 4) == [(0, 2), (1, 0), (1, 1), (1, 2), (1, 3)]
    assert normalize_spec(" ALL ") == "all" and normalize_spec("l1h2, L0") == "L1H2,L0"
    assert normalize_spec("Penultimate", SR_WORDS) == "penultimate"
    with pytest.raises(ConfigError, match=r"^cannot parse 'L١'; use 'all' or labels like L9H11,L10$"):
        normalize_spec("L0,L١")
    with pytest.raises(ConfigError, match=r"^--heads: L5 is out of range; the model has layers 0..1$"):
        parse_heads("L5", 2, 4)
