"""One output function for `sql`, `query` and `export`: a frame in a chosen format.

Text formats go to a file or stdout; Parquet needs a file. Floats are shown with six
significant digits in table, Markdown and LaTeX; CSV, JSON and Parquet keep full precision.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import polars as pl

from selfrepair.errors import QueryError

FORMATS = ("table", "csv", "json", "markdown", "latex", "parquet")
BINARY_FORMATS = ("parquet",)

_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def format_value(value) -> str:
    """One cell as text: floats to six significant digits, nulls empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.6g}"
    return str(value)


def _is_numeric(dtype: pl.DataType) -> bool:
    return dtype.is_numeric()


def _cells(df: pl.DataFrame) -> list[list[str]]:
    return [[format_value(v) for v in row] for row in df.iter_rows()]


def render_table(df: pl.DataFrame) -> str:
    """An aligned plain-text table: numbers right-aligned, text left-aligned."""
    rows = _cells(df)
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(df.columns)]
    right = [_is_numeric(t) for t in df.dtypes]

    def line(cells):
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    out = [line(df.columns), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    out.append(f"({df.height} row{'s' if df.height != 1 else ''})")
    return "\n".join(out) + "\n"


def render_markdown(df: pl.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (pipes in cells escaped)."""
    right = [_is_numeric(t) for t in df.dtypes]

    def line(cells):
        return "| " + " | ".join(c.replace("|", r"\|") for c in cells) + " |"

    out = [line(df.columns), "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    out += [line(r) for r in _cells(df)]
    return "\n".join(out) + "\n"


def latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)


def render_latex(df: pl.DataFrame) -> str:
    """A booktabs `tabular` (needs `\\usepackage{booktabs}`), every cell escaped."""
    spec = "".join("r" if _is_numeric(t) else "l" for t in df.dtypes)

    def line(cells):
        return " & ".join(latex_escape(c) for c in cells) + r" \\"

    out = [rf"\begin{{tabular}}{{{spec}}}", r"\toprule", line(df.columns), r"\midrule"]
    out += [line(r) for r in _cells(df)]
    out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


def render_json(df: pl.DataFrame) -> str:
    """A JSON array of row objects."""
    return df.write_json() + "\n"


def render_csv(df: pl.DataFrame) -> str:
    return df.write_csv()


_RENDERERS = {
    "table": render_table,
    "csv": render_csv,
    "json": render_json,
    "markdown": render_markdown,
    "latex": render_latex,
}


def write_output(df: pl.DataFrame, fmt: str = "table", output: str | Path | None = None) -> None:
    """Write a frame in one format to a file, or to stdout when `output` is None.

    Args:
        df: the result to write.
        fmt: one of FORMATS.
        output: destination file; required for parquet.

    Raises:
        QueryError: an unknown format, or parquet without an output file.
    """
    if fmt not in FORMATS:
        raise QueryError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if fmt == "parquet":
        if output is None:
            raise QueryError("format parquet needs an output file (--output FILE)")
        _to_file(output, lambda path: df.write_parquet(path))
        return
    text = _RENDERERS[fmt](df)
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        _to_file(output, lambda path: path.write_text(text))


def _to_file(output: str | Path, write) -> None:
    path = Path(output)
    try:
        write(path)
    except OSError as e:
        raise QueryError(f"cannot write {path}: {e.strerror or e}") from None
