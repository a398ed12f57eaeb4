"""Safe SQL: a DuckDB connection that can read the store's committed files and nothing else.

Two independent guards:
  1. `lock_down` sets DuckDB's own sandbox: no extension (auto)loading or installing,
     file access limited to an allow-list of the store's Parquet files (`allowed_paths`,
     not `allowed_directories`, which would let `COPY … TO` write inside the store),
     `enable_external_access=false`, then `lock_configuration=true`, so no `SET` or
     `RESET` can undo any of it.
  2. `check_read_only` parses the text first and accepts exactly one SELECT (or EXPLAIN,
     or a PIVOT, which DuckDB runs as an ENUM type then a SELECT) statement,
     so `COPY`, `ATTACH`, `INSTALL`, `CREATE`, `SET`, `PRAGMA`… fail with one clear error
     even where the sandbox alone would have allowed them (CREATE in the in-memory catalog).
"""

from __future__ import annotations

import re
from pathlib import Path

import duckdb

from selfrepair.errors import QueryError

ALLOWED_STATEMENTS = (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN)
_PIVOT = re.compile(r"^\s*(?:(?:--[^\n]*\n|/\*.*?\*/)\s*)*(?:UN)?PIVOT\b", re.IGNORECASE | re.DOTALL)


def lock_down(con: duckdb.DuckDBPyConnection, readable: list[str], temp_dir: Path, memory_limit: str) -> None:
    """Sandbox a connection whose views are already created.

    Args:
        con: the connection to lock.
        readable: the only files queries may read (the store's committed Parquet files,
            by real path and as the glob-escaped patterns the views name them by).
        temp_dir: a private folder for DuckDB's spill files (outside the store).
        memory_limit: DuckDB's memory limit (e.g. "8GiB"): beyond it a query spills or
            fails with one line, rather than meeting the system's out-of-memory killer.
    """
    con.execute("SET memory_limit = $m", {"m": memory_limit})
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET temp_directory = $d", {"d": str(temp_dir)})
    con.execute("SET allowed_directories = $d", {"d": []})
    con.execute("SET allowed_paths = $p", {"p": sorted(set(map(str, readable)))})
    con.execute("SET enable_external_access = false")
    # Last: from here on no setting above can be changed back.
    con.execute("SET lock_configuration = true")


def check_read_only(con: duckdb.DuckDBPyConnection, text: str) -> str:
    """Parse `text` and return it if it is exactly one SELECT statement.

    Raises:
        QueryError: for a parse error, several statements, or any other statement kind.
    """
    check_text(text)
    try:
        statements = con.extract_statements(text)
    except duckdb.Error as e:
        raise QueryError(one_line(e)) from None
    if len(statements) != 1:
        raise QueryError(f"expected exactly one SELECT statement, got {len(statements)}")
    try:
        kind = statements[0].type
    except ValueError:  # a statement kind newer than the client's enum (UPDATE EXTENSIONS: 29)
        raise QueryError("only read-only SELECT queries are allowed, not a statement of a kind "
                         "this client does not know") from None
    # DuckDB parses a PIVOT whose columns come from the data as MULTI (an ENUM type of the
    # values, then the SELECT): read-only, and the sandbox still holds for both parts.
    if kind == duckdb.StatementType.MULTI and _PIVOT.match(text):
        return text
    if kind not in ALLOWED_STATEMENTS:
        name = getattr(kind, "name", str(kind))
        raise QueryError(f"only read-only SELECT queries are allowed, not a {name} statement")
    return text


def check_text(text: str) -> None:
    """Refuse query text that is not a string of valid UTF-8 (a shell passes raw bytes as surrogates)."""
    if not isinstance(text, str):
        raise QueryError(f"query text must be a string, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = text[e.start]
        what = f"byte 0x{ord(ch) - 0xDC00:02X}" if 0xDC80 <= ord(ch) <= 0xDCFF else f"character U+{ord(ch):04X}"
        raise QueryError(f"query text is not valid UTF-8 ({what} at character {e.start + 1})") from None


def one_line(error: BaseException) -> str:
    """DuckDB's message without its caret diagram: the lines before `LINE n:` joined."""
    lines = []
    for line in str(error).splitlines():
        if line.startswith("LINE "):
            break
        if line.strip():
            lines.append(line.strip())
    text = " ".join(lines) or type(error).__name__
    # A refusal a query raises itself (SQL `error(...)`) reads as its own line, not DuckDB's kind.
    return text.removeprefix("Invalid Input Error: ")
