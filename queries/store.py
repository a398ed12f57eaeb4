"""`Store`: a read-only, sandboxed DuckDB connection over a store root, answering in Polars.

    >>> store = Store.open("stores")
    >>> store.sql("SELECT layer, avg(sr) FROM self_repair GROUP BY 1")
    >>> store.query("layer_summary", p=0.02)
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

import duckdb
import polars as pl

from selfrepair.errors import QueryError, StoreNotFound
from selfrepair.queries import interrupt, named, requests, safety, views
from selfrepair.store.inventory import Inventory
from selfrepair.store.model_store import list_models
from selfrepair.store.schema import TABLES


class Store:
    """Every model of a store root behind one read-only SQL connection.

    Use `Store.open(path)`; the constructor takes an already built connection.
    """

    def __init__(self, root: Path, con: duckdb.DuckDBPyConnection, manifests: dict[str, dict]):
        self.root = root
        self._con = con
        self._manifests = manifests

    @classmethod
    def open(cls, path: str | Path) -> "Store":
        """Open a store root (or one model folder) and lock it down.

        Args:
            path: a store root holding model folders, or one model folder.

        Returns:
            A Store whose views cover every committed shard at this moment.

        Raises:
            StoreNotFound: the path is missing or holds no model.
        """
        root = Path(path).resolve()
        models = []
        for ms in list_models(root):
            manifest = ms.manifest()
            files = {t: [p.resolve() for p in ms.table_files(t, manifest)] for t in TABLES}
            models.append(views.ModelFiles(ms.name, manifest, files))
        if not models:
            raise StoreNotFound(f"no selfrepair store at {root}")
        con = duckdb.connect(":memory:")
        try:
            for statement in views.view_statements(models):
                con.execute(statement)
        except duckdb.Error as e:
            con.close()
            raise QueryError(f"cannot build views over {root}: {safety.one_line(e)}") from None
        temp_dir = Path(tempfile.mkdtemp(prefix="selfrepair-duckdb-"))
        readable = [p for m in models for paths in m.files.values() for p in paths]
        safety.lock_down(con, readable, temp_dir)
        store = cls(root, con, {m.model: m.manifest for m in models})
        weakref.finalize(store, _cleanup, con, temp_dir)
        return store

    @property
    def models(self) -> list[str]:
        """Model folder names, sorted (the `model` column's values)."""
        return sorted(self._manifests)

    @property
    def views(self) -> list[str]:
        """Every view name; table macros are listed in `macros`."""
        return views.view_names()

    @property
    def macros(self) -> list[str]:
        return list(views.MACROS)

    def manifest(self, model: str) -> dict:
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
            The result as a Polars frame.

        Raises:
            QueryError: not a single SELECT, bad SQL, a sandbox refusal, or interrupted.
        """
        safety.check_read_only(self._con, text)
        try:
            table = self._run(text, params or None)
        except (duckdb.InterruptException, KeyboardInterrupt):
            raise QueryError("query interrupted") from None
        except duckdb.Error as e:
            raise QueryError(safety.one_line(e)) from None
        return pl.from_arrow(table)

    def _run(self, text: str, params: dict | None):
        """Execute and fetch everything as Arrow; Ctrl-C interrupts the query."""
        with interrupt.sigint_interrupts(self._con):
            return self._con.sql(text, params=params).to_arrow_table()

    def query(self, name: str, **params) -> pl.DataFrame:
        """Run a named query from `queries/sql/`.

        Args:
            name: the file's stem, e.g. `layer_summary`.
            **params: values for its `$` parameters; missing ones take their defaults.

        Raises:
            UnknownQuery: no such named query.
            QueryError: a required parameter is missing, or the query failed.
        """
        q = named.get_query(name)
        bound = q.bind(params)
        requests.check(self.inventories, bound)  # never an empty answer for what was not ingested
        return self.sql(q.sql, bound)

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


def _cleanup(con: duckdb.DuckDBPyConnection, temp_dir: Path) -> None:
    try:
        con.close()
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
