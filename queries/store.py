"""`Store`: a read-only, sandboxed DuckDB connection over a store root, answering in Polars.

    >>> store = Store.open("stores")
    >>> store.sql("SELECT layer, avg(sr) FROM self_repair GROUP BY 1")
    >>> store.query("layer_summary", p=0.02)
    >>> store.head("L26H6")          # a unit's page: Polars frames, and the page itself in a notebook
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa

from selfrepair.errors import PartialStore, PartialStoreWarning, QueryError, StoreNotFound
from selfrepair.queries import interrupt, named, requests, safety, shape, views
from selfrepair.store import files
from selfrepair.store.coverage import Coverage, coverage
from selfrepair.store.manifest import Manifest
from selfrepair.store.inventory import Inventory
from selfrepair.store.model_store import list_models
from selfrepair.store.schema import LEGACY_COLUMNS, TABLES


@dataclass(frozen=True)
class Rows:
    """Which rows of a named query's result to keep: sorted by the column `sort` (largest first
    with `desc`), then the first `limit` (None: every row; no sort: the query's own order)."""

    limit: int | None = None
    sort: str | None = None
    desc: bool = False

    def wrap(self, text: str) -> str:
        """The query `text` wrapped so its rows are sorted and cut."""
        if self.limit is None and self.sort is None:
            return text
        if self.limit is not None and self.limit < 0:
            raise QueryError(f"limit: must be >= 0, got {self.limit}")
        out = f"SELECT * FROM (\n{text.rstrip().rstrip(';')}\n) AS q"
        if self.sort is not None:
            out += f' ORDER BY "{self.sort.replace(chr(34), chr(34) * 2)}"' + (" DESC" if self.desc else "")
        if self.limit is not None:
            out += f" LIMIT {int(self.limit)}"
        return out


class Store:
    """Every model of a store root behind one read-only SQL connection.

    Use `Store.open(path)`; the constructor takes an already built connection.
    """

    def __init__(self, root: Path, con: duckdb.DuckDBPyConnection, manifests: dict[str, Manifest],
                 covered: dict[str, Coverage] | None = None):
        self.root = root
        self._con = con
        self._manifests = manifests
        self._lacking: dict[str, list[str]] = {}  # `-- needs:` name -> models whose store lacks it
        # model -> what of its plan it holds (store/coverage.py)
        self.coverage: dict[str, Coverage] = covered or {m: coverage(m, man) for m, man in manifests.items()}

    @classmethod
    def open(cls, path: str | Path, memory_limit: str | None = None, *, strict: bool = False,
             warn: bool = True) -> "Store":
        """Open a store root (or one model folder) and lock it down.

        A model folder holding less than its plan (an unfinished ingest; draws or units covering
        fewer tokens than the store: `store/coverage.py`) is partial: every answer then covers the
        stored tokens only. Opening one warns with `PartialStoreWarning` (Python's `warnings`, so
        `warnings.simplefilter("error", PartialStoreWarning)` or `strict=True` refuses it); the
        facts are `Store.coverage` and `Store.partial_text()`.

        Args:
            path: a store root holding model folders, or one model folder.
            memory_limit: DuckDB's memory limit (default: half the machine's memory, or
                $SELFREPAIR_MEMORY_LIMIT), so a huge query fails with one line.
            strict: refuse a partial store (PartialStore) instead of warning.
            warn: warn about a partial store (the CLI prints its own line instead).

        Returns:
            A Store whose views cover every committed shard at this moment.

        Raises:
            StoreNotFound: the path is missing or holds no model.
            PartialStore: `strict` and some model folder is partial (the message says what is missing).
        """
        root = Path(path).resolve()
        models, readable = [], []
        for ms in list_models(root):
            manifest = ms.manifest()
            real = {t: [p.resolve() for p in ms.table_files(t, manifest)] for t in TABLES}
            readable += [p for paths in real.values() for p in paths]
            # The views name each file by a pattern that matches only itself (a folder `a?` is not `ab`).
            patterns = {t: [Path(files.glob_literal(p)) for p in paths] for t, paths in real.items()}
            readable += [p for paths in patterns.values() for p in paths]
            models.append(views.ModelFiles(ms.name, manifest, patterns))
        if not models:
            raise StoreNotFound(f"no selfrepair store at {root}")
        covered = {m.model: coverage(m.model, m.manifest) for m in models}
        text = partial_text(covered.values())
        if text and strict:
            raise PartialStore(f"{text}; refused (strict): finish the ingest, or read without strict")
        if text and warn:
            warnings.warn(text, PartialStoreWarning, stacklevel=2)
        con = duckdb.connect(":memory:")
        try:
            models = [replace(m, lacking=(lack := _lacking_columns(con, m.files)),
                              missing={t: set().union(*by_file.values()) for t, by_file in lack.items()})
                      for m in models]
            for statement in views.view_statements(models):
                con.execute(statement)
        except duckdb.Error as e:
            con.close()
            raise QueryError(f"cannot build views over {root}: {safety.one_line(e)}") from None
        temp_dir = Path(tempfile.mkdtemp(prefix="selfrepair-duckdb-"))
        safety.lock_down(con, readable, temp_dir, memory_limit or default_memory_limit())
        store = cls(root, con, {m.model: m.manifest for m in models}, covered)
        store._lacking = {"neuron_ranks": sorted(m.model for m in models
                                                 if "rank" in m.missing.get("neuron_effects", set())),
                          "output_metrics": sorted(m.model for m in models
                                                   if "kl" in m.missing.get("ablation_effects", set())),
                          "counterfactuals": sorted(m.model for m in models if not m.manifest.config.counterfactuals)}
        weakref.finalize(store, _cleanup, con, temp_dir)
        return store

    def lacking(self, need: str) -> list[str]:
        """The models whose store lacks a named query's `-- needs:` data (e.g. `output_metrics`), sorted."""
        return list(self._lacking.get(need, []))

    @property
    def models(self) -> list[str]:
        """Model folder names, sorted (the `model` column's values)."""
        return sorted(self._manifests)

    @property
    def views(self) -> list[str]:
        """Every view name (the table macros are listed in `selfrepair sql --help`)."""
        return views.view_names()

    def partial_text(self, models: list[str] | None = None) -> str:
        """One line naming each partial model (of `models`, default all) and what it lacks, or ''."""
        return partial_text(c for m, c in self.coverage.items() if models is None or m in models)

    def manifest(self, model: str) -> Manifest:
        """The parsed manifest of one model folder."""
        try:
            return self._manifests[model]
        except KeyError:
            raise StoreNotFound(f"no model {model!r} in {self.root}; models: {', '.join(self.models)}") from None

    def sql(self, text: str, params: dict | None = None) -> pl.DataFrame:
        """Run one read-only SELECT over the views.

        Args:
            text: one SELECT statement; `$name` placeholders are bound from `params`.
            params: values for the placeholders.

        Returns:
            The result as a Polars frame (duplicate column names made unique and types
            Polars cannot hold given as text, see `queries/shape.py`).

        Raises:
            QueryError: not a single SELECT, bad SQL, a sandbox refusal, or interrupted.
        """
        return self.sql_head(text, params, None)[0]

    def sql_head(self, text: str, params: dict | None = None,
                 max_rows: int | None = None) -> tuple[pl.DataFrame, bool]:
        """Like `sql`, fetching at most `max_rows` rows (None: all).

        Returns:
            (the frame, whether the result has more rows than were fetched).
        """
        with self._guard():
            rel = self._relation(text, params)
            if max_rows is not None:
                rel = rel.limit(max_rows + 1)  # one more, to know whether the result was cut
            table = rel.to_arrow_table()
            more = max_rows is not None and table.num_rows > max_rows
            return pl.from_arrow(table.slice(0, max_rows) if more else table), more

    def sql_batches(self, text: str, params: dict | None = None, for_csv: bool = False,
                    batch_rows: int = 65536) -> Iterator:
        """Stream one read-only SELECT as Arrow record batches (memory stays one batch), an empty one first.

        Args:
            for_csv: also give nested and binary columns as text (a CSV cell holds neither).
        """
        with self._guard():
            reader = self._relation(text, params, for_csv).to_arrow_reader(batch_rows)
            yield pa.RecordBatch.from_pylist([], schema=reader.schema)  # the columns, even for no rows
            yield from reader

    def _relation(self, text: str, params: dict | None, for_csv: bool = False):
        safety.check_read_only(self._con, text)
        return shape.shape(self._con.sql(text, params=params or None), for_csv)

    @contextlib.contextmanager
    def _guard(self):
        """DuckDB and Polars errors as one-line QueryErrors; Ctrl-C interrupts the running query."""
        try:
            with interrupt.sigint_interrupts(self._con):
                yield
        except (duckdb.InterruptException, KeyboardInterrupt):
            raise QueryError("query interrupted") from None
        except duckdb.OutOfMemoryException as e:
            reason = safety.one_line(e).split(" Possible solutions")[0]
            raise QueryError(f"{reason}: the query needs more than DuckDB's memory limit; raise "
                             "$SELFREPAIR_MEMORY_LIMIT, or aggregate or LIMIT the query") from None
        except duckdb.Error as e:
            raise QueryError(safety.one_line(e)) from None
        except pl.exceptions.PolarsError as e:
            raise QueryError(f"cannot convert the result: {safety.one_line(e)}") from None

    def query(self, name: str, rows: Rows | None = None, /, **params) -> pl.DataFrame:
        """Run a named query from `queries/sql/`.

        Args:
            name: the file's stem, e.g. `layer_summary`.
            rows: sort and cut the result (`Rows(limit=5, sort="sr", desc=True)`; the CLI's
                `--limit`, `--sort` and `--desc`); None: every row in the query's order.
            **params: values for its `$` parameters; missing ones take their defaults.

        Raises:
            UnknownQuery: no such named query.
            QueryError: a required parameter is missing, or the query failed.
        """
        return self.sql(*self.named_sql(name, rows, **params))

    def named_sql(self, name: str, rows: Rows | None = None, /, **params) -> tuple[str, dict]:
        """A named query's SQL (sorted and cut by `rows`) and its bound parameters (every check a
        named query gets happens here).

        The CLI runs the pair through `queries/output.write_result`, so it streams or caps like `sql`.
        """
        q = named.get_query(name)
        bound = q.bind(params)
        requests.check(self.inventories, bound)  # never an empty answer for what was not ingested
        requests.check_needs(name, q.needs, self._lacking)
        return (rows or Rows()).wrap(q.sql), bound

    def activations(self, model: str | None = None, token_coords: bool = True):
        """A model's Zarr activations and saved weights as a lazy `xarray.Dataset` with named,
        labelled dimensions (see `queries/activations.py`); `model` may be omitted with one model.
        `token_coords=False` leaves out the per-token coordinates (row, pos, strings: a query over
        every token), for a reader that indexes tokens by number."""
        from selfrepair.queries.activations import open_activations

        if model is None:
            if len(self.models) != 1:
                raise QueryError(f"the store holds {len(self.models)} models; name one: {', '.join(self.models)}")
            model = self.models[0]
        manifest = self.manifest(model)
        tokens = self.sql("SELECT token_index, row, pos, token_str, next_token_str FROM tokens WHERE model = $m "
                          "ORDER BY token_index", {"m": model}) if token_coords else None
        vocab = self.sql("SELECT token_id, token_str FROM vocab WHERE model = $m ORDER BY token_id", {"m": model})
        folder = next(ms.path for ms in list_models(self.root) if ms.name == model)
        return open_activations(folder, manifest, tokens, vocab if vocab.height else None)

    @property
    def inventories(self) -> list[Inventory]:
        """What each model folder holds (ablations, draws, heads, tokens, arrays), from its manifest."""
        return [Inventory.of(m, self._manifests[m]) for m in self.models]

    def interrupt(self) -> None:
        """Stop the running query (safe from another thread); it raises QueryError."""
        self._con.interrupt()

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def partial_text(coverages) -> str:
    """`partial store: tiny-gpt2 has resample: 124 of 310 tokens; zero: 62 of 310 tokens` over the partial
    models (joined by ` | `), or ''."""
    parts = [c.text() for c in coverages if c.partial]
    return ("partial store: " + " | ".join(parts)) if parts else ""


# Columns added to a table after stores were written with it (store/schema.py LEGACY_COLUMNS): a
# store without them still opens; the view fills them in (`views.LEGACY_FILL`) or gives NULL, and
# the queries that need them refuse (see `requests.check_needs`).
ADDED_COLUMNS = {table: tuple(c for c in TABLES[table].column_names if any(c not in old for old in layouts))
                 for table, layouts in LEGACY_COLUMNS.items()}


def _lacking_columns(con: duckdb.DuckDBPyConnection, table_files: dict[str, list[Path]]
                     ) -> dict[str, dict[Path, frozenset[str]]]:
    """Per table of ADDED_COLUMNS, each file lacking some of its added columns and which (Parquet footers only)."""
    out = {}
    for table, added in ADDED_COLUMNS.items():
        paths = table_files.get(table) or []
        if not paths:
            continue
        rows = con.execute("SELECT file_name, name FROM parquet_schema($files)",
                           {"files": [str(p) for p in paths]}).fetchall()
        have: dict[str, set[str]] = {}
        for file_name, name in rows:
            have.setdefault(file_name, set()).add(name)
        # parquet_schema names each file by its real path; the views name it by a pattern matching only it.
        have = {files.glob_literal(name): cols for name, cols in have.items()}
        lacking = {p: frozenset(c for c in added if c not in have.get(str(p), set())) for p in paths}
        lacking = {p: cols for p, cols in lacking.items() if cols}
        if lacking:
            out[table] = lacking
    return out


def default_memory_limit() -> str:
    """$SELFREPAIR_MEMORY_LIMIT, else half the machine's memory (the rest for the result in Python)."""
    env = os.environ.get("SELFREPAIR_MEMORY_LIMIT")
    if env:
        return env
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return "4GiB"
    return f"{max(total // 2 >> 20, 256)}MiB"


def _cleanup(con: duckdb.DuckDBPyConnection, temp_dir: Path) -> None:
    try:
        con.close()
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
