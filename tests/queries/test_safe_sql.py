"""Safe SQL: user queries can read the store's views and nothing else (issue #4)."""

from __future__ import annotations

import threading

import pytest

from selfrepair.errors import QueryError
from selfrepair.queries.store import Store

ATTACKS = {
    "copy_to_outside": "COPY (SELECT 1) TO '{tmp}/out.csv'",
    "copy_into_store": "COPY (SELECT * FROM tokens) TO '{root}/gpt2-tiny/tables/tokens/clean-0000.parquet' (FORMAT parquet)",
    "read_passwd": "SELECT * FROM read_csv('/etc/passwd')",
    "read_text_outside": "SELECT * FROM read_text('{tmp}/secret.txt')",
    "glob": "SELECT * FROM glob('{root}/*')",
    "attach": "ATTACH '{tmp}/other.duckdb' AS other",
    "install": "INSTALL httpfs",
    "load": "LOAD httpfs",
    "create_table": "CREATE TABLE t AS SELECT 1 AS a",
    "create_view": "CREATE VIEW v AS SELECT 1 AS a",
    "drop_view": "DROP VIEW tokens",
    "set_external": "SET enable_external_access = true",
    "reset_lock": "RESET lock_configuration",
    "pragma": "PRAGMA enable_profiling",
    "two_statements": "SELECT 1; COPY (SELECT 1) TO '{tmp}/out.csv'",
}


@pytest.fixture()
def fresh(store_root):
    with Store.open(store_root) as s:
        yield s


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_refused(fresh, store_root, tmp_path, spec, name):
    (tmp_path / "secret.txt").write_text("secret\n")
    before = spec.digest_tree(store_root)
    text = ATTACKS[name].format(tmp=tmp_path, root=store_root)
    with pytest.raises(QueryError) as info:
        fresh.sql(text)
    message = str(info.value)
    assert message and "\n" not in message
    assert spec.digest_tree(store_root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.txt"]
    # The store still answers afterwards.
    assert fresh.sql("SELECT count(*) AS n FROM tokens")["n"][0] > 0


def test_statement_kind_named(fresh, tmp_path):
    with pytest.raises(QueryError, match="only read-only SELECT queries are allowed, not a COPY statement"):
        fresh.sql(f"COPY (SELECT 1) TO '{tmp_path}/x.csv'")


def test_sandbox_blocks_selects_outside_store(fresh):
    # A SELECT passes the statement check; DuckDB's own sandbox must refuse the file.
    with pytest.raises(QueryError, match="Permission Error"):
        fresh.sql("SELECT * FROM read_csv('/etc/passwd')")


def test_settings_locked(fresh, store_root):
    df = fresh.sql(
        "SELECT name, value FROM duckdb_settings() WHERE name IN "
        "('enable_external_access', 'lock_configuration', 'autoload_known_extensions', "
        "'autoinstall_known_extensions', 'allowed_directories') ORDER BY name"
    )
    settings = dict(df.rows())
    # DuckDB always allows its own spill folder: a private temp dir, never the store.
    spill = settings.pop("allowed_directories")
    assert "selfrepair-duckdb-" in spill and str(store_root) not in spill and "," not in spill
    assert settings == {
        "autoinstall_known_extensions": "false",
        "autoload_known_extensions": "false",
        "enable_external_access": "false",
        "lock_configuration": "true",
    }


def test_bad_sql_one_line(fresh):
    with pytest.raises(QueryError) as info:
        fresh.sql("SELEC 1")
    assert str(info.value) == 'Parser Error: syntax error at or near "SELEC"'
    with pytest.raises(QueryError, match="^Catalog Error: Table with name nosuch does not exist!"):
        fresh.sql("SELECT * FROM nosuch")


def test_missing_sql_parameter(fresh):
    with pytest.raises(QueryError, match="parameters: a"):
        fresh.sql("SELECT $a AS x")


def test_interrupt_stops_cleanly(fresh, store_root, spec):
    before = spec.digest_tree(store_root)
    timer = threading.Timer(0.3, fresh.interrupt)  # what Ctrl-C does in the CLI
    timer.start()
    try:
        with pytest.raises(QueryError) as info:
            fresh.sql("SELECT count(*) FROM range(100000000000) a, tokens")
    finally:
        timer.cancel()
    assert str(info.value) == "query interrupted"
    assert spec.digest_tree(store_root) == before
    assert fresh.sql("SELECT 1 AS one")["one"][0] == 1  # connection still usable


def test_keyboard_interrupt_becomes_query_error(fresh, monkeypatch):
    # Ctrl-C may also surface as a plain KeyboardInterrupt (e.g. between DuckDB calls).
    monkeypatch.setattr(fresh, "_con", _Proxy(fresh._con))
    with pytest.raises(QueryError, match="^query interrupted$"):
        fresh.sql("SELECT 1")


class _Proxy:
    """A connection whose query result raises KeyboardInterrupt when read."""

    def __init__(self, con):
        self._con = con

    def sql(self, *args, **kwargs):
        class Result:
            def __getattr__(self, name):  # columns, types, to_arrow_table…: the first read is interrupted
                raise KeyboardInterrupt

        return Result()

    def __getattr__(self, name):
        return getattr(self._con, name)


def test_real_sigint_in_main_thread(fresh):
    import os
    import signal

    # A genuine Ctrl-C while DuckDB runs in the main thread: queries/interrupt.py stops it.
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(QueryError, match="^query interrupted$"):
            fresh.sql("SELECT count(*) FROM range(100000000000) a, tokens")
    finally:
        timer.cancel()
    assert fresh.sql("SELECT 2 AS two")["two"][0] == 2


def test_sigint_between_queries_is_kept(fresh):
    import os
    import signal

    from selfrepair.queries.interrupt import sigint_interrupts

    # A Ctrl-C inside the block but outside DuckDB is not lost: it is re-raised at the end.
    with pytest.raises(KeyboardInterrupt):
        with sigint_interrupts(fresh._con):
            os.kill(os.getpid(), signal.SIGINT)
            threading.Event().wait(0.2)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
