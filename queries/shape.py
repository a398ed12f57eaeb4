"""Shape a query's result so that Polars, and every output format, can hold it.

Two things a valid SELECT can return that a Polars frame cannot:
  - duplicate column names (`SELECT a.token_index, b.token_index …`): renamed the way
    DuckDB's own Python client does (`token_index`, `token_index_1`, compared
    case-insensitively), see `dedupe_names`;
  - types Polars cannot import or print (INTERVAL, UNION, BIT, BIGNUM, TIMETZ, and dates or
    timestamps, which may be ±infinity or outside Python's years 1–9999 and then panic
    inside Polars): these columns come back as DuckDB's own text for the value.

CSV has no nested or binary cells either, so for CSV lists, structs, maps, arrays and
blobs become text as well. The renaming and casting is one projection over the user's
relation, by column position (`#n`), so no user text is ever re-parsed.
"""

from __future__ import annotations

import duckdb

# DuckDB type ids (DuckDBPyType.id) whose values become text.
TEXT_TYPES = frozenset({
    "interval", "union", "bit", "varint", "bignum", "time with time zone",
    "date", "timestamp", "timestamp with time zone", "timestamp_ns", "timestamp_ms", "timestamp_s",
})
# And, for CSV only, what a CSV cell cannot hold.
CSV_TEXT_TYPES = TEXT_TYPES | {"list", "struct", "map", "array", "blob"}


def dedupe_names(names: list[str]) -> list[str]:
    """Unique column names, as DuckDB's client de-duplicates them (QueryResult::DeduplicateColumns).

    A repeated name gets `_1`, `_2`, … (skipping any name already taken); names are
    compared case-insensitively, as DuckDB compares identifiers.
    """
    seen: dict[str, int] = {}
    out = []
    for name in names:
        low = name.lower()
        if low not in seen:
            seen[low] = 1
            out.append(name)
            continue
        new = f"{name}_{seen[low]}"
        while new.lower() in seen:
            seen[low] += 1
            new = f"{name}_{seen[low]}"
        seen[new.lower()] = 1
        out.append(new)
    return out


def _needs_text(t: duckdb.DuckDBPyType, text_types: frozenset[str]) -> bool:
    if t.id in text_types:
        return True
    if t.id in ("list", "struct", "map", "array", "union"):
        # A fixed-size ARRAY's children also hold its size (an int), not only its element type.
        return any(_needs_text(child, text_types) for _, child in t.children
                   if not isinstance(child, int))
    return False


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def shape(rel: duckdb.DuckDBPyRelation, for_csv: bool = False) -> duckdb.DuckDBPyRelation:
    """`rel` with unique column names and every type Polars (or CSV) cannot hold cast to text."""
    text_types = CSV_TEXT_TYPES if for_csv else TEXT_TYPES
    names, types = rel.columns, rel.types
    unique = dedupe_names(names)
    cast = [_needs_text(t, text_types) for t in types]
    if unique == names and not any(cast):
        return rel
    # Positions and quoted names only: the user's SQL is not touched.
    exprs = [(f"CAST(#{i} AS VARCHAR)" if c else f"#{i}") + f" AS {_quote(n)}"
             for i, (n, c) in enumerate(zip(unique, cast), 1)]
    return rel.project(", ".join(exprs))
