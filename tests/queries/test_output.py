"""Output formats: one writer for sql, query and export."""

from __future__ import annotations

import json

import polars as pl
import pytest

from selfrepair.errors import QueryError
from selfrepair.queries.output import FORMATS, latex_escape, render_latex, render_markdown, render_table, write_output

DF = pl.DataFrame({"model": ["gpt2_small", "a&b|c"], "layer": [0, 11], "sr": [0.123456789, -2.5e-7], "ok": [None, 1.0]})


def test_table_aligned_and_rounded():
    text = render_table(DF)
    lines = text.splitlines()
    assert lines[0].split() == ["model", "layer", "sr", "ok"]
    assert "0.123457" in text and "-2.5e-07" in text and "0.123456789" not in text
    assert lines[-1] == "(2 rows)"
    assert len({len(l) for l in lines[1:2]}) == 1


def test_markdown():
    text = render_markdown(DF)
    assert text.splitlines()[1] == "|---|---:|---:|---:|"
    assert r"a&b\|c" in text


def test_latex_booktabs_escaped():
    text = render_latex(DF)
    assert r"\begin{tabular}{@{}lrrr@{}}" in text and r"\toprule" in text and r"\bottomrule" in text
    # `|` prints as an em dash in Computer Modern's text font: escaped too (issue 22)
    assert r"gpt2\_small" in text and r"a\&b\textbar{}c" in text
    assert latex_escape(r"50% $x^2$ #1 {a} ~ \ ") == r"50\% \$x\textasciicircum{}2\$ \#1 \{a\} \textasciitilde{} \textbackslash{} "


def test_csv_round_trip(tmp_path):
    path = tmp_path / "out.csv"
    write_output(DF, "csv", path)
    back = pl.read_csv(path)
    assert back["model"].to_list() == DF["model"].to_list()
    assert back["sr"].to_list() == DF["sr"].to_list()  # CSV keeps full precision


def test_parquet_round_trip(tmp_path):
    path = tmp_path / "out.parquet"
    write_output(DF, "parquet", path)
    assert pl.read_parquet(path).equals(DF)


def test_json(capsys):
    write_output(DF, "json")
    rows = json.loads(capsys.readouterr().out)
    assert rows[0] == {"model": "gpt2_small", "layer": 0, "sr": 0.123456789, "ok": None}


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "parquet"])
def test_every_text_format_to_stdout_and_file(fmt, tmp_path, capsys):
    write_output(DF, fmt)
    out = capsys.readouterr().out
    path = tmp_path / f"x.{fmt}"
    write_output(DF, fmt, path)
    assert out and path.read_text() == out


def test_latex_fits_a_page():
    """Constant columns are dropped and named, wide tables scale to the line, long ones break across pages
    (issue 22: in a `table` with caption and label, one precision per column; tests/queries/test_latex.py
    checks the rest)."""
    one = DF.with_columns(pl.lit("smollm2").alias("model"))
    text = render_latex(one)
    assert text.splitlines()[1] == "% constant columns, dropped: model = smollm2"
    assert r"\begin{tabular}{@{}rrr@{}}" in text and "smollm2" not in text.split("\n", 2)[2]
    assert "0.123" in text and "0.1235" not in text  # three significant digits for the column's largest
    wide = render_latex(pl.DataFrame({f"c{i}": [float(i), i + 0.5] for i in range(9)}))
    assert r"\resizebox{\ifdim\width>\linewidth\linewidth" in wide
    long = render_latex(pl.concat([DF] * 30))
    assert r"\begin{longtable}{@{}lrrr@{}}" in long and r"\endhead" in long
    assert long.count(r"\\") == 60 + 2 + 1  # rows, the header twice, the caption line


def test_empty_frame():
    empty = DF.clear()
    assert render_table(empty).splitlines()[-1] == "(0 rows)"
    assert render_latex(empty).count(r"\\") == 1


def test_parquet_needs_output():
    with pytest.raises(QueryError, match="needs an output file"):
        write_output(DF, "parquet")


def test_unknown_format():
    with pytest.raises(QueryError, match="unknown format 'xml'"):
        write_output(DF, "xml")


def test_unwritable_output(tmp_path):
    with pytest.raises(QueryError, match="cannot write"):
        write_output(DF, "csv", tmp_path / "no" / "such" / "dir.csv")
