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


# -- units (DESIGN.md "Beyond single heads") ------------------------------------------------

from selfrepair.store.labels import (  # noqa: E402
    Unit, is_label, normalize_conditions, normalize_units, parse_unit, parse_units, units_spec)


@pytest.mark.parametrize("text,kind,label,heads,mlps", [
    ("l9h6", "head", "L9H6", ((9, 6),), ()),
    ("L10H0+l9h6", "group", "L9H6+L10H0", ((9, 6), (10, 0)), ()),
    ("attn2", "attn", "ATTN2", ((2, 0), (2, 1), (2, 2)), ()),
    ("Mlp3", "mlp", "MLP3", (), (3,)),
    ("BLOCK1", "block", "BLOCK1", ((1, 0), (1, 1), (1, 2)), (1,)),
    ("L4H1+", None, None, None, None),
])
def test_each_unit_kind_parses_to_its_components(text, kind, label, heads, mlps):
    if kind is None:
        with pytest.raises(ConfigError, match="empty member"):
            parse_unit(text)
        return
    unit = parse_unit(text)
    assert (unit.kind, unit.label, unit.heads(3), unit.mlps()) == (kind, label, heads, mlps)
    assert parse_unit(unit.canonical) == unit  # the canonical label reads back as the same unit
    assert (unit.layer, unit.head) == (min(l for l, _ in heads) if heads else mlps[0], 6 if kind == "head" else -1)


def test_a_units_list_expands_shorthands_and_keeps_group_names():
    units = parse_units("L1, mlps, backup=L1H2+L0H1, attn, blocks, heads", n_layers=2, n_heads=3)
    labels = [u.label for u in units]
    assert labels[:3] == ["L1H0", "L1H1", "L1H2"] and "backup" in labels
    assert labels.count("L1H0") == 1  # `heads` repeats L1's heads: each unit once
    assert {u.kind for u in units} == {"head", "mlp", "group", "attn", "block"}
    assert len(units) == 3 + 2 + 1 + 2 + 2 + 3  # L1's heads, 2 MLPs, the group, 2 ATTN, 2 BLOCK, L0's heads
    again = parse_units(units_spec(units), 2, 3)
    assert again == units  # what a shard records reads back as the same units, names included


@pytest.mark.parametrize("spec,message", [
    ("MLP99", r"^--units: MLP99 is out of range; the model has layers 0..1$"),
    ("L1H40", r"^--units: L1H40 is out of range; the model has heads 0..2$"),
    ("+", r"^--units: '\+' is an empty group"),
    ("L1H1+L1H1", r"^--units: group 'L1H1\+L1H1' names L1H1 twice$"),
    ("a=L1H1+L1H2,a=L0H1+L0H2", r"^--units: the name 'a' is used twice$"),
    ("mlp1=L1H1+L1H2", r"^--units: the name 'mlp1' is also a label; choose another$"),
    ("heads=L1H1+L1H2", r"^--units: the name 'heads' is also a label"),
    ("x=MLP1", r"^--units: only a group of heads can be named"),
    ("MLP1+L1H1", r"^--units: group 'MLP1\+L1H1' has 'MLP1': a group joins heads"),
    ("neurons", r"^--units: cannot parse 'neurons'; use heads, mlps"),
])
def test_bad_units_get_one_line(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_units(spec, n_layers=2, n_heads=3)


def test_units_are_checked_without_the_model_and_written_canonically():
    assert normalize_units("MLPS, l3, l2h1+L1H0, b=L5H0+L4H4") == "mlps,L3,L1H0+L2H1,b=L4H4+L5H0"
    assert normalize_conditions(["L9H9+l9h6", "L9H6+L9H9"]) == ("L9H6+L9H9",)
    with pytest.raises(ConfigError, match="--given takes one unit"):
        normalize_conditions(["L1H1,L1H2"])
    assert is_label("attn") and is_label("L3") and is_label("block2") and not is_label("backup")


def test_overlap_is_by_component():
    block, head, mlp = parse_unit("BLOCK1"), parse_unit("L1H2"), parse_unit("MLP0")
    assert block.overlaps(head, 3) and not mlp.overlaps(head, 3) and parse_unit("MLP1").overlaps(block, 3)
    assert Unit("group", 0, members=((0, 1), (1, 2))).overlaps(head, 3)
