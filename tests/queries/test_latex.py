"""LaTeX paper tables (issue 22): one precision per column, table/longtable with caption and label,
booktabs, the packages named, and 8 columns in one column of a two-column paper.

Every table is parse-checked (balanced environments and braces, the same number of cells in every
row as the column spec has columns, only known commands). Where pdflatex is installed (Debian:
texlive-latex-base and texlive-latex-recommended) the same tables are compiled too, in a 10 pt
two-column article of ICML's column width, and must give no error and no overfull box.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import polars as pl
import pytest

from selfrepair.queries.latex import FIT_COLUMNS, LONG_TABLE_ROWS, column_format, render_latex

KNOWN = {"begin", "end", "toprule", "midrule", "bottomrule", "caption", "label", "centering", "small", "footnotesize",
         "scriptsize", "setlength", "tabcolsep", "shortstack", "times", "textbackslash", "textasciitilde",
         "textasciicircum", "textbar", "textless", "textgreater", "infty", "resizebox", "ifdim", "width", "linewidth",
         "else", "fi", "endfirsthead", "endhead", "endfoot", "begingroup", "endgroup"}
ENVIRONMENTS = {"table", "tabular", "longtable"}
ICML_COLUMN = r"\setlength{\textwidth}{6.75in}\setlength{\columnsep}{0.25in}"  # columns of 3.25 in


def _columns(spec: str) -> int:
    return len(re.sub(r"@\{[^}]*\}", "", spec))


def _top_level(line: str) -> str:
    """The line with every brace group emptied (a stacked header's `\\\\` and an escaped `\\&` are not cells)."""
    line = line.replace(r"\&", "").replace(r"\{", "").replace(r"\}", "")
    while re.search(r"\{[^{}]*\}", line):
        line = re.sub(r"\{[^{}]*\}", "", line)
    return line


def parse_check(text: str) -> dict:
    """Check a table's LaTeX without TeX; returns the environments and column count found."""
    body = [line for line in text.splitlines() if not line.startswith("%")]
    src = "\n".join(body)
    assert src.replace(r"\{", "").replace(r"\}", "").count("{") == src.replace(r"\{", "").replace(r"\}", "").count("}")
    stack, envs, n_cols = [], [], None
    for line in body:
        for kind, env in re.findall(r"\\(begin|end)\{(\w+)\}", line):
            assert env in ENVIRONMENTS, env
            if kind == "begin":
                stack.append(env)
                envs.append(env)
            else:
                assert stack.pop() == env
        spec = re.search(r"\\begin\{(?:tabular|longtable)\}\{((?:[^{}]|\{[^{}]*\})*)\}", line)
        if spec:
            n_cols = _columns(spec.group(1))
        if line.rstrip().endswith(r"\\") and n_cols is not None and not line.startswith(r"\caption"):
            assert _top_level(line).count("&") == n_cols - 1, line
        assert line.replace(r"\$", "").count("$") % 2 == 0, line
    assert not stack
    unknown = set(re.findall(r"\\([A-Za-z]+)", src.replace("\\\\", " "))) - KNOWN
    assert not unknown, unknown
    return {"envs": envs, "columns": n_cols}


def worst_case(n_cols: int, n_rows: int = 12) -> pl.DataFrame:
    """The widest cells three significant digits give (negative, below 1) under the layer table's headers."""
    rng = np.random.default_rng(n_cols)
    names = ["DE", "Ablated DE", "Logit change", "Self-repair", "Heads", "MLPs", "LayerNorm", "LN share (%)"]
    cols = {"Layer": list(range(n_rows)), "Tokens": [20480 + i for i in range(n_rows)]}
    cols |= {name: -rng.uniform(0.1, 0.999, n_rows) for name in names[:n_cols - 2]}
    return pl.DataFrame(cols)


def compile_latex(tables: dict[str, str], tmp_path) -> dict[str, str]:
    """Compile the tables in one 10 pt two-column article of ICML's column width (the longtable last,
    after \\onecolumn: longtable needs a one-column page); returns each table's part of the log."""
    parts = []
    for name, text in tables.items():
        parts += [r"\onecolumn" if "longtable" in text else "", rf"\typeout{{TABLE {name}}}", text]
    doc = "\n".join([r"\documentclass[10pt,twocolumn]{article}", ICML_COLUMN,
                     r"\usepackage{booktabs}\usepackage{longtable}\usepackage{graphicx}", r"\begin{document}",
                     *parts, r"\typeout{TABLE end}", r"\end{document}"])
    (tmp_path / "doc.tex").write_text(doc)
    r = subprocess.run([PDFLATEX, "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    log = (tmp_path / "doc.log").read_text(errors="replace")
    assert r.returncode == 0, log[-3000:]
    pieces = re.split(r"^TABLE (\w+)$", log, flags=re.M)
    return dict(zip(pieces[1::2], pieces[2::2]))


PDFLATEX = shutil.which("pdflatex")
TABLES = {
    "escaped": pl.DataFrame({"model": ["gpt2_small", "a&b|c<d>", "x\ny"], "layer": [0, 11, 3],
                             "sr": [0.123456789, -2.5e-7, float("nan")], "ok": [None, 1.0, 2.5]}),
    **{f"worst{n}": worst_case(n) for n in (5, 7, FIT_COLUMNS)},
    "wide": worst_case(10),
    "long": worst_case(6, LONG_TABLE_ROWS + 5),
}


@pytest.mark.parametrize("name", list(TABLES))
def test_parse_check(name):
    text = render_latex(TABLES[name], "Self-repair per layer & model", "tab:layers")
    found = parse_check(text)
    assert found["columns"] == TABLES[name].width
    first = text.splitlines()[0]
    assert first.startswith("% needs: \\usepackage{booktabs}")
    if name == "long":
        assert found["envs"] == ["longtable"] and r"\endhead" in text and "\\usepackage{longtable}" in first
        assert text.count(r"\caption{") == 1
    else:
        assert found["envs"][0] == "table" and r"\caption{Self-repair per layer \& model}" in text
        assert ("\\usepackage{graphicx}" in first) == (name == "wide") == (r"\resizebox" in text)
    assert r"\label{tab:layers}" in text and r"\toprule" in text and r"\bottomrule" in text


@pytest.mark.skipif(PDFLATEX is None, reason="no pdflatex (apt-get install texlive-latex-base "
                    "texlive-latex-recommended); test_parse_check covers the same tables")
def test_compiles_and_fits_one_column(tmp_path):
    """No error; the tables of up to 8 columns fit a column of 3.25 in unscaled, the wider one is scaled to it."""
    logs = compile_latex({name: render_latex(df, "Self-repair per layer", f"tab:{name}") for name, df in TABLES.items()},
                         tmp_path)
    assert set(logs) == {*TABLES, "end"}
    for name in TABLES:
        assert "Overfull \\hbox" not in logs[name], name


def test_one_precision_per_column():
    """Every number of a column has the same decimals: the largest magnitude keeps 3 significant digits."""
    df = pl.DataFrame({"a": [4.875, 0.3181, -0.0004], "b": [0.00123, -0.0004, 0.0], "c": [123456.0, 7.0, -1.5],
                       "d": [9.996, 1.0, 2.0]})
    text = render_latex(df)
    rows = [line for line in text.splitlines() if line.endswith(r"\\") and "&" in line][1:]
    cells = [[c.strip().removesuffix(r"\\").strip() for c in row.split("&")] for row in rows]
    assert [r[0] for r in cells] == ["4.88", "0.32", "0.00"]  # not 4.875 beside 0.3181
    assert [r[1] for r in cells] == ["1.23", "$-$0.40", "0.00"] and r"($\times10^{-3}$)" in text
    assert [r[2] for r in cells] == ["1.23", "0.00", "0.00"] and r"($\times10^{5}$)" in text  # -0.00 loses its sign
    assert [r[3] for r in cells] == ["10.0", "1.0", "2.0"]  # 9.996 rounds up to 10.0: three digits, one decimal
    assert column_format([None, float("nan"), 0.0]) == (0, 0)


def test_constant_columns_dropped_and_named():
    df = TABLES["escaped"].with_columns(pl.lit("smollm2").alias("model"))
    text = render_latex(df)
    assert text.splitlines()[1] == "% constant columns, dropped: model = smollm2"
    assert "smollm2" not in "\n".join(text.splitlines()[2:])


def test_empty_frame_parses():
    text = render_latex(TABLES["escaped"].clear())
    assert parse_check(text)["columns"] == 4 and text.count(r"\\") == 1
