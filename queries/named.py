"""Named queries: one `.sql` file each in `queries/sql/`, runnable as-is in a DuckDB shell.

Header format (leading `--` comment lines):

    -- Title on the first line
    -- Description, any number of lines.
    -- param p: 0.02 — fraction of tokens        (a default)
    -- param layer — layer of the ablated head    (required)
    -- needs: neuron_ranks                        (stored data the query cannot run without)

The parameter list itself is read from the SQL text (`$name` placeholders, found by
DuckDB's parser so comments and string literals are ignored); the header only adds
defaults and help.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import duckdb

from selfrepair.errors import QueryError, UnknownQuery
from selfrepair.queries.bootstrap import check_params
from selfrepair.queries.requests import split_head_label

SQL_DIR = Path(__file__).parent / "sql"
_NEEDS_LINE = re.compile(r"^needs:\s*(.+)$")
_PARAM_LINE = re.compile(r"^param\s+(\w+)\s*(?::\s*(.*?))?\s*(?:[—–]|--)\s*(.*)$")
_INT = re.compile(r"^[+-]?[0-9]+$")
_FLOAT = re.compile(r"^[+-]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)([eE][+-]?[0-9]+)?$")


@dataclass(frozen=True)
class Param:
    """One `$name` parameter: its default (None: required) and help text."""

    name: str
    default: object = None
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is None


@dataclass(frozen=True)
class NamedQuery:
    """A parsed `queries/sql/<name>.sql` file."""

    name: str
    title: str
    description: str
    sql: str
    params: tuple[Param, ...] = field(default=())
    needs: tuple[str, ...] = field(default=())

    def bind(self, values: dict) -> dict:
        """Defaults filled in and values coerced; raises QueryError naming a missing or unknown one."""
        known = {p.name for p in self.params}
        if "head" in known:
            values = split_head_label(values)  # head=L26H6 means layer 26, head 6
        unknown = sorted(set(values) - known)
        if unknown:
            raise QueryError(
                f"query '{self.name}' has no parameter {unknown[0]!r}; "
                f"its parameters: {', '.join(sorted(known)) or 'none'}"
            )
        out = {}
        for p in self.params:
            value = values.get(p.name, p.default)
            if value is None:
                raise QueryError(f"query '{self.name}' needs parameter '{p.name}' ({p.help})")
            out[p.name] = coerce(value)
        check_params(out)  # the confidence intervals' level, seed and replicates
        return out


def coerce(value):
    """A string from the command line (or a header default) as int, float or text."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    return value


def parse(path: Path) -> NamedQuery:
    """Parse one `.sql` file into a NamedQuery."""
    text = path.read_text()
    header = []
    for line in text.splitlines():
        if not line.startswith("--"):
            break
        header.append(line[2:].strip())
    title = header[0] if header else path.stem
    description, declared, needs = [], {}, []
    for line in header[1:]:
        m = _PARAM_LINE.match(line)
        n = _NEEDS_LINE.match(line)
        if n:
            needs += n.group(1).replace(",", " ").split()
        elif m:
            name, default, doc = m.groups()
            declared[name] = Param(name, default if default else None, doc.strip())
        elif line:
            description.append(line)
    try:
        statements = duckdb.extract_statements(text)
    except duckdb.Error as e:
        raise QueryError(f"{path}: {e}") from None
    if len(statements) != 1:
        raise QueryError(f"{path}: expected one statement, found {len(statements)}")
    used = statements[0].named_parameters
    undeclared = sorted(set(declared) - set(used))
    if undeclared:
        raise QueryError(f"{path}: header declares {undeclared} but the SQL never uses them")
    # Order: as declared in the header, then any undocumented ones alphabetically.
    names = [n for n in declared if n in used] + sorted(set(used) - set(declared))
    params = tuple(declared.get(n, Param(n)) for n in names)
    return NamedQuery(path.stem, title, " ".join(description), text, params, tuple(needs))


@lru_cache(maxsize=1)
def all_queries() -> dict[str, NamedQuery]:
    """Every named query, by name, sorted."""
    return {p.stem: parse(p) for p in sorted(SQL_DIR.glob("*.sql"))}


def get_query(name: str) -> NamedQuery:
    """The named query, or UnknownQuery listing the known names (and close matches)."""
    queries = all_queries()
    if name in queries:
        return queries[name]
    close = difflib.get_close_matches(name, list(queries), n=3)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    raise UnknownQuery(f"unknown query {name!r}; known: {', '.join(queries)}{hint}")
