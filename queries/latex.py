"""A frame as a paper table: LaTeX with booktabs rules, a caption and a label.

What a paper needs without hand editing (issue 22):
- every number of a column has the same decimals, chosen so that the column's largest
  magnitude keeps `SIGNIFICANT` significant digits (3: a per-layer mean of self-repair is
  not known better, and the column stays narrow); a column whose largest magnitude is below
  0.01 or at least 10^5 is scaled by a power of ten, named in its header (`$\\times10^{-3}$`);
- a `table` float with `\\caption` and `\\label` (caption above, as ICML and ACL ask), or a
  `longtable` beyond `LONG_TABLE_ROWS` rows, which breaks across pages and repeats its header;
- the packages it needs, in a comment on its first line;
- up to `FIT_COLUMNS` columns fit one column of a two-column paper (ICML: 3.25 in, 234.9 pt)
  at natural size, even when every number is negative and below 1 (`$-$0.488`, the widest
  cell three significant digits give): the font and the space between columns step down with
  the column count (`FONT_SIZES`), no outer padding (`@{}`), and a header of several words stacked on
  lines about as wide as the column's cells. tests/queries/test_latex.py compiles those
  worst cases where pdflatex is installed. A wider table is scaled down to the line only when
  it would overflow (`\\resizebox`, needs graphicx); no table of 8 columns or fewer is scaled.
"""

from __future__ import annotations

import math
import re

import polars as pl

LONG_TABLE_ROWS = 40
FIT_COLUMNS = 8
# (most columns, font size, space each side of a column): the first that holds the table's column
# count. Measured in a 10 pt two-column article (tests/queries/test_latex.py), worst-case cells:
# 5 columns at \small, 7 at \footnotesize fit 234.9 pt with 3 pt; 8 need \scriptsize and 2 pt
# (Computer Modern's 7 pt design is wide: \scriptsize alone saves only 5%).
FONT_SIZES = ((5, r"\small", "3pt"), (7, r"\footnotesize", "3pt"), (FIT_COLUMNS, r"\scriptsize", "2pt"))
SIGNIFICANT = 3
_SCALE_BELOW, _SCALE_FROM = 1e-2, 1e5  # a column's largest magnitude outside this range is scaled
_MISSING = "--"  # an empty or NaN cell

_ESCAPES = {
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
    # Computer Modern's OT1 text fonts print these three as an em dash and inverted marks.
    "|": r"\textbar{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
}
_CONTROL = str.maketrans({"\n": "\\n", "\t": "\\t", "\r": "\\r"})  # one cell stays on one line


def latex_escape(text: str) -> str:
    return "".join(_ESCAPES.get(ch, ch) for ch in text)


def _text(value) -> str:
    """A cell that is not a float, escaped; newlines and tabs shown as `\\n` and `\\t`."""
    return _MISSING if value is None else latex_escape(str(value).translate(_CONTROL))


def column_format(values: list) -> tuple[int, int]:
    """(decimals, power of ten the column is divided by) for a float column: one number of decimals
    for every cell, giving the largest finite magnitude `SIGNIFICANT` significant digits.

    Args:
        values: the column's cells (None and NaN ignored).
    """
    finite = [abs(v) for v in values if v is not None and math.isfinite(v)]
    top = max(finite, default=0.0)
    if top == 0.0:
        return 0, 0
    exponent = math.floor(math.log10(top))
    # Rounding may carry the top value to the next power of ten (9.996 -> 10.0): one digit more.
    if round(top / 10**exponent, SIGNIFICANT - 1) >= 10:
        exponent += 1
    scale = exponent if top < _SCALE_BELOW or top >= _SCALE_FROM else 0
    return max(0, SIGNIFICANT - 1 - (exponent - scale)), scale


def _number(value, decimals: int, scale: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _MISSING
    if math.isinf(value):
        return r"$\infty$" if value > 0 else r"$-\infty$"
    text = f"{value / 10**scale:.{decimals}f}"
    if float(text) == 0:
        text = text.lstrip("-")  # -0.000 reads as a negative number
    # A typographic minus ($-$), not a hyphen.
    return "$-$" + text[1:] if text.startswith("-") else text


def _header(name: str, width: int, scale: int) -> str:
    """A column name, escaped; several words are stacked on lines about as wide as the column's cells."""
    # Words split at spaces and after hyphens ("Self-" / "repair").
    words, lines = re.findall(r"[^\s-]*-+|[^\s-]+", name), []
    for word in words:
        joined = lines[-1] + ("" if lines and lines[-1].endswith("-") else " ") + word if lines else word
        if lines and len(joined) <= max(width, 1):
            lines[-1] = joined
        else:
            lines.append(word)
    lines = [latex_escape(line) for line in lines] or [""]
    if scale:
        lines.append(rf"($\times10^{{{scale}}}$)")
    return lines[0] if len(lines) == 1 else r"\shortstack{" + r"\\".join(lines) + "}"


def _label(label: str | None) -> str:
    """A label keeps letters, digits and `:-_.` (others become `-`), so it needs no escaping."""
    return re.sub(r"[^A-Za-z0-9:._-]+", "-", label or "tab:selfrepair")


def render_latex(df: pl.DataFrame, caption: str | None = None, label: str | None = None) -> str:
    """A booktabs table, every cell escaped and every number column at one precision.

    Columns with one value in every row are dropped and named in a comment above the table.

    Args:
        df: the result.
        caption: the table's caption (default: a generic one to replace).
        label: its `\\label` (default `tab:selfrepair`).

    Returns:
        The LaTeX text: package comment, then a `table` (or, beyond LONG_TABLE_ROWS rows, a `longtable`).
    """
    constant = [c for c in df.columns if df.height > 1 and df[c].n_unique() == 1]
    notes = ["% constant columns, dropped: " + "; ".join(
        f"{c} = {_plain(df[c][0])}" for c in constant)] if constant else []
    if constant and len(constant) < df.width:
        df = df.drop(constant)
    numeric = [t.is_numeric() for t in df.dtypes]
    columns, heads = [], []
    for name, is_num in zip(df.columns, numeric):
        values = df[name].to_list()
        if is_num and df[name].dtype.is_float():
            decimals, scale = column_format(values)
            cells = [_number(v, decimals, scale) for v in values]
        else:
            scale, cells = 0, [_text(v) for v in values]
        columns.append(cells)
        heads.append(_header(name, max((_visible(c) for c in cells), default=0), scale))
    rows = [" & ".join(r) + r" \\" for r in zip(*columns)] if columns else []
    header = " & ".join(heads) + r" \\"
    spec = "@{}" + "".join("r" if n else "l" for n in numeric) + "@{}"
    long = len(rows) > LONG_TABLE_ROWS
    wide = df.width > FIT_COLUMNS
    _, size, sep = next((f for f in FONT_SIZES if df.width <= f[0]), FONT_SIZES[-1])
    packages = ["booktabs"] + (["longtable"] if long else []) + (["graphicx"] if wide and not long else [])
    caption_line = rf"\caption{{{latex_escape(caption or 'Result of a selfrepair query.')}}}"
    label_line = rf"\label{{{_label(label)}}}"
    uses = ", ".join(r"\usepackage{" + p + "}" for p in packages)
    first = [f"% needs: {uses}"]
    if long:
        first.append("% longtable works in one-column pages only (in a two-column paper: \\onecolumn before it)")
        body = [r"\begingroup" + size + rf"\setlength{{\tabcolsep}}{{{sep}}}", rf"\begin{{longtable}}{{{spec}}}",
                caption_line + label_line + r" \\", r"\toprule", header, r"\midrule", r"\endfirsthead",
                r"\toprule", header, r"\midrule", r"\endhead", r"\bottomrule", r"\endfoot", *rows,
                r"\end{longtable}", r"\endgroup"]
    else:
        tabular = [rf"\begin{{tabular}}{{{spec}}}", r"\toprule", header, r"\midrule", *rows, r"\bottomrule",
                   r"\end{tabular}"]
        if wide:  # beyond FIT_COLUMNS only, and only when it would overflow the line
            tabular = [r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%", *tabular[:-1],
                       r"\end{tabular}}"]
        body = [r"\begin{table}[tbp]", r"\centering", caption_line, label_line, size,
                rf"\setlength{{\tabcolsep}}{{{sep}}}", *tabular, r"\end{table}"]
    return "\n".join(first + notes + body) + "\n"


def _plain(value) -> str:
    """A dropped constant's value in a comment: one line, as the table would show it."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value).translate(_CONTROL)


def _visible(cell: str) -> int:
    """About how many characters a cell shows (commands and `$` dropped), to wrap headers."""
    return len(re.sub(r"\\[A-Za-z]+|[${}]", "", cell.replace("$-$", "-")))
