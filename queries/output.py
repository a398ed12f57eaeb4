"""One output function for `sql`, `query` and `export`: a frame in a chosen format.

Text formats go to a file or stdout; Parquet needs a file. Floats are shown with six
significant digits in table and Markdown, at one precision per column in LaTeX
(`queries/latex.py`); CSV, JSON and Parquet keep full precision.

`write_result` runs a query straight into its output: CSV and Parquet stream batch by
batch (a result larger than memory is fine), the other formats fetch at most `max_rows`
rows. No output path may lie inside a store: a read-only command never changes a store.
"""

from __future__ import annotations

import math
import os
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from selfrepair.errors import QueryError
from selfrepair.queries.latex import latex_escape, render_latex  # noqa: F401 - latex_escape re-exported
from selfrepair.store.model_store import enclosing_model_folder

if TYPE_CHECKING:
    from selfrepair.queries.store import Store

FORMATS = ("table", "csv", "json", "markdown", "latex", "parquet")
STREAMED_FORMATS = ("csv", "parquet")
DEFAULT_MAX_ROWS = 10_000



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


_ESCAPES = str.maketrans({"\n": "\\n", "\t": "\\t", "\r": "\\r"})


def _cells(df: pl.DataFrame) -> list[list[str]]:
    """Every cell as one line of text: newlines, tabs and carriage returns escaped (a `\\n`
    token must not break the table, Markdown or LaTeX layout)."""
    return [[format_value(v).translate(_ESCAPES) for v in row] for row in df.iter_rows()]


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


def write_output(df: pl.DataFrame, fmt: str = "table", output: str | Path | None = None,
                 caption: str | None = None, label: str | None = None) -> None:
    """Write a frame in one format to a file, or to stdout when `output` is None.

    Args:
        df: the result to write.
        fmt: one of FORMATS.
        output: destination file; required for parquet.
        caption, label: the LaTeX table's `\\caption` and `\\label` (other formats ignore them).

    Raises:
        QueryError: an unknown format, parquet without an output file, or the file cannot be written.
    """
    if fmt not in FORMATS:
        raise QueryError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if fmt == "parquet":
        if output is None:
            raise QueryError("format parquet needs an output file (--output FILE)")
        _to_file(output, lambda f: df.write_parquet(f))
        return
    try:
        text = render_latex(df, caption, label) if fmt == "latex" else _RENDERERS[fmt](df)
    except pl.exceptions.PolarsError as e:
        raise QueryError(f"cannot write the result as {fmt}: {str(e).splitlines()[0]}") from None
    if output is None:
        _to_stdout(lambda f: f.write(text.encode()))
    else:
        _to_file(output, lambda f: f.write(text.encode()))


def write_result(store: "Store", text: str, params: dict | None, fmt: str, output: str | Path | None,
                 max_rows: int | None = DEFAULT_MAX_ROWS, caption: str | None = None,
                 label: str | None = None) -> str | None:
    """Run one query into its output: CSV and Parquet streamed, other formats at most `max_rows` rows.

    Args:
        store: the open store.
        text, params: the SELECT and its parameters.
        fmt: one of FORMATS.
        output: destination file (None: stdout), never inside a store.
        max_rows: the most rows fetched for a non-streamed format (None: no cap).
        caption, label: the LaTeX table's caption and label.

    Returns:
        A note for the user when the rows shown were capped, else None.

    Raises:
        QueryError: a bad query, an output inside a store, a capped result for a file, or a write error.
    """
    if fmt not in FORMATS:
        raise QueryError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if output is not None:
        check_output_path(output, store.root)
    if fmt in STREAMED_FORMATS:
        if fmt == "parquet" and output is None:
            raise QueryError("format parquet needs an output file (--output FILE)")
        batches = store.sql_batches(text, params, for_csv=fmt == "csv")
        write = _stream_csv(batches) if fmt == "csv" else _stream_parquet(batches)
        _to_stdout(write) if output is None else _to_file(output, write)
        return None
    df, more = store.sql_head(text, params, max_rows)
    if more and output is not None:
        raise QueryError(f"the result has more than {max_rows} rows; raise --max-rows (0: no cap), "
                         "or use --format csv or parquet, which stream any number of rows")
    write_output(df, fmt, output, caption, label)
    if more:
        return f"note: showing the first {max_rows} rows; the result has more (--max-rows 0 shows all)"
    return None


def _stream_csv(batches):
    def write(f):
        first = True
        for batch in batches:
            if batch.num_rows or first:
                pl.from_arrow(batch).write_csv(f, include_header=first)
                first = False
    return write


def _stream_parquet(batches):
    def write(f):
        import pyarrow.parquet as pq

        writer = None
        try:
            for batch in batches:
                if writer is None:
                    writer = pq.ParquetWriter(f, batch.schema, compression="zstd")
                writer.write_batch(batch)
        finally:
            if writer is not None:
                writer.close()
    return write


def check_output_path(output: str | Path, store_root: str | Path | None = None) -> None:
    """Refuse an output path inside the open store or inside ANY store's model folder (symlinks resolved).

    The one rule for every command that writes a file (`sql`, `query` and `export --output`,
    `head --html`, `report --output`): a read-only command never changes a store, its own
    or another. A model folder is recognised by its manifest or commit log
    (`store/model_store.py: is_model_folder`) in the target's folder or any parent.

    Raises:
        QueryError: naming the path and the store it lies in.
    """
    real = Path(os.path.realpath(output))
    if store_root is not None:
        root = Path(os.path.realpath(store_root))
        if real == root or root in real.parents:
            raise QueryError(f"refusing to write {output}: it lies inside the store {store_root} "
                             "(a read-only command never changes a store); write it elsewhere")
    folder = enclosing_model_folder(real)
    if folder is not None:
        raise QueryError(f"refusing to write {output}: it lies inside the model folder {folder} "
                         "(a read-only command never changes a store); write it elsewhere")


def _to_stdout(write) -> None:
    try:
        sys.stdout.flush()  # text echoed before stays before
        write(sys.stdout.buffer)
        sys.stdout.buffer.flush()
    except (OSError, pl.exceptions.PolarsError) as e:
        raise QueryError(f"cannot write to stdout: {_reason(e)}") from None


def _to_file(output: str | Path, write) -> None:
    """Write a regular file under a temporary name and rename it into place (no half file is left);
    anything else (/dev/stdout, a pipe) is written directly."""
    path = Path(output)
    direct = path.exists() and not path.is_file()
    target = path if direct else path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(target, "wb") as f:
            write(f)
        if not direct:
            os.replace(target, path)
    except (OSError, pl.exceptions.PolarsError) as e:
        raise QueryError(f"cannot write {path}: {_reason(e)}") from None
    finally:
        if not direct and target.exists():
            target.unlink(missing_ok=True)


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError):
        return e.strerror or str(e)
    text = str(e)
    if "No space left on device" in text:
        return "No space left on device"
    return text.splitlines()[0] if text else type(e).__name__
