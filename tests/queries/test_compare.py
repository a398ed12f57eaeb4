"""`selfrepair compare`: two stored models side by side (issue 22), on the synthetic stores of conftest.py.

gpt2-tiny is 2 layers × 3 heads, pythia-tiny 3 × 2: different shapes, compared by relative depth.
A second store holds another gpt2-tiny (other numbers): one model in two stores, same shape.
Expected values are recomputed here from the per-head query with hand-written layer sets.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from selfrepair.errors import ConfigError, QueryError
from selfrepair.queries.compare import QUANTITIES, Side, compare, depth_bin, parse_quantities
from selfrepair.queries.store import Store

from conftest import TOP_P, make_model


@pytest.fixture(scope="module")
def other_root(tmp_path_factory):
    """A second store: gpt2-tiny again, drawn with another seed."""
    root = tmp_path_factory.mktemp("other")
    make_model(root / "gpt2-tiny", 2, 3, 40, seed=7)
    return root


@pytest.fixture(scope="module")
def other(other_root):
    with Store.open(other_root) as s:
        yield s


def _heads(s: Store, model: str) -> pl.DataFrame:
    return s.query("head_top_self_repair", p=TOP_P, ablation="resample", sample=0).filter(pl.col("model") == model)


def _mean(heads: pl.DataFrame, layers: list[int], q: str) -> float:
    return float(np.mean(heads.filter(pl.col("layer").is_in(layers))[q].to_numpy()))


def test_depth_bins():
    # relative depth l / (L - 1): first and last layers of any model meet in the first and last bins
    assert [depth_bin(la, 3, 2) for la in range(3)] == [0, 1, 1]
    assert [depth_bin(la, 2, 2) for la in range(2)] == [0, 1]
    assert depth_bin(11, 12, 12) == depth_bin(23, 24, 12) == 11 and depth_bin(12, 24, 12) == 6
    assert depth_bin(0, 1, 4) == 0


def test_different_shapes_by_relative_depth(store):
    result = compare(Side(store, "gpt2-tiny"), Side(store, "pythia-tiny"), quantities=("sr", "sr_ln"))
    assert result.by == "depth" and result.labels == ("gpt2-tiny", "pythia-tiny")
    frame = result.frame
    assert frame.columns == ["depth", "layers gpt2-tiny", "layers pythia-tiny", "quantity", "gpt2-tiny", "pythia-tiny",
                             "diff"]
    assert frame["depth"].to_list() == ["0.00-0.50"] * 2 + ["0.50-1.00"] * 2
    assert frame["layers pythia-tiny"].to_list() == ["0", "0", "1-2", "1-2"]
    a, b = _heads(store, "gpt2-tiny"), _heads(store, "pythia-tiny")
    want_a = [_mean(a, [0], "sr"), _mean(a, [0], "sr_ln"), _mean(a, [1], "sr"), _mean(a, [1], "sr_ln")]
    want_b = [_mean(b, [0], "sr"), _mean(b, [0], "sr_ln"), _mean(b, [1, 2], "sr"), _mean(b, [1, 2], "sr_ln")]
    np.testing.assert_allclose(frame["gpt2-tiny"], want_a, rtol=1e-12)
    np.testing.assert_allclose(frame["pythia-tiny"], want_b, rtol=1e-12)
    np.testing.assert_allclose(frame["diff"], np.array(want_b) - np.array(want_a), rtol=1e-12)
    assert any("relative depth" in n for n in result.notes)


def test_one_model_in_two_stores_per_head_and_layer(store, other, store_root, other_root):
    heads = compare(Side(store, "gpt2-tiny"), Side(other, "gpt2-tiny"), by="head")
    layers = compare(Side(store, "gpt2-tiny"), Side(other, "gpt2-tiny"), quantities=("d_logit",))
    la, lb = heads.labels
    assert (la, lb) == (f"gpt2-tiny ({store_root.name})", f"gpt2-tiny ({other_root.name})")
    assert heads.frame.height == 6 * len(QUANTITIES) and heads.frame["head"][0] == "L0H0"
    a, b = _heads(store, "gpt2-tiny"), _heads(other, "gpt2-tiny")
    sr = heads.frame.filter(pl.col("quantity") == "sr")
    np.testing.assert_allclose(sr[la], a.sort("layer", "head")["sr"], rtol=1e-12)
    np.testing.assert_allclose(sr[lb], b.sort("layer", "head")["sr"], rtol=1e-12)
    assert layers.by == "layer" and layers.frame["layer"].to_list() == [0, 1]
    np.testing.assert_allclose(layers.frame[lb], [_mean(b, [0], "d_logit"), _mean(b, [1], "d_logit")], rtol=1e-12)


def test_cli_table_and_csv(cli, store_root, other_root):
    r = CliRunner().invoke(cli, ["compare", "gpt2-tiny", "pythia-tiny", "--store", str(store_root),
                                 "--quantity", "sr"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == f"gpt2-tiny: gpt2-tiny in {store_root} (2 layers × 3 heads; 40 tokens, top 4 per head)"
    assert lines[-1] == "(2 rows)" and lines[5].split()[:4] == ["depth", "layers", "gpt2-tiny", "layers"]
    r = CliRunner().invoke(cli, ["compare", "gpt2-tiny", "gpt2-tiny", "--store", str(store_root), "--store",
                                 str(other_root), "--by", "head", "-f", "json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert len(rows) == 6 * len(QUANTITIES) and set(rows[0]) == {
        "head", "quantity", f"gpt2-tiny ({store_root.name})", f"gpt2-tiny ({other_root.name})", "diff"}
    r = CliRunner().invoke(cli, ["compare", "gpt2-tiny", "pythia-tiny", "--store", str(store_root), "-f", "latex"])
    assert r.exit_code == 0 and r.stdout.startswith("% needs: \\usepackage{booktabs}")
    assert r"\caption{Self-repair of gpt2-tiny and pythia-tiny per depth.}" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["gpt2-tiny", "pythia-tiny", "--by", "head"],
     "Error: a per-head comparison needs models of one shape: gpt2-tiny has 2 layers × 3 heads, pythia-tiny 3 × 2; "
     "compare them --by layer (by relative depth)"),
    (["gpt2-tiny", "nope"], "Error: model 'nope' is not in the store {root}; models: gpt2-tiny, pythia-tiny"),
    (["gpt2-tiny", "pythia-tiny", "--quantity", "sr,loss"],
     "Error: quantity 'loss' is not one of " + ", ".join(QUANTITIES)),
    (["gpt2-tiny", "pythia-tiny", "--ablation", "mean"], None),
    (["gpt2-tiny", "gpt2-tiny"], "Error: both sides are gpt2-tiny of the store {root}: nothing to compare"),
    (["gpt2-tiny", "pythia-tiny", "--bins", "0"], "Error: bins: must be positive, got 0"),
])
def test_bad_input_one_error_line(cli, store_root, args, message):
    r = CliRunner().invoke(cli, ["compare", *args, "--store", str(store_root)])
    assert r.exit_code != 0 and r.output.startswith("Error: ") and r.output.count("\n") == 1, r.output
    if message:
        assert r.output == message.format(root=store_root) + "\n"


def test_bins_only_for_different_shapes(store, other):
    with pytest.raises(ConfigError, match="bins: only"):
        compare(Side(store, "gpt2-tiny"), Side(other, "gpt2-tiny"), bins=2)
    with pytest.raises(ConfigError):
        parse_quantities("sr,,nope")
    assert parse_quantities(None) == QUANTITIES and parse_quantities("sr, sr_ln,sr") == ("sr", "sr_ln")
    with pytest.raises(QueryError, match="draw 3"):
        compare(Side(store, "gpt2-tiny"), Side(store, "pythia-tiny"), sample=3)
