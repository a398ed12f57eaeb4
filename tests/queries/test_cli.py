"""`selfrepair sql / query / export` through click's CliRunner: exit codes and exact errors."""

from __future__ import annotations

import polars as pl
import pytest
from click.testing import CliRunner

from selfrepair.queries import named


@pytest.fixture()
def run(cli, store_root):
    def invoke(*args, store=True):
        extra = ["--store", str(store_root)] if store else []
        return CliRunner().invoke(cli, [*args, *extra])

    return invoke


def _error_line(result) -> str:
    lines = result.output.strip().splitlines()
    return lines[-1]


def test_sql_table(run):
    r = run("sql", "SELECT model, count(*) AS n FROM tokens GROUP BY model ORDER BY model")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0].split() == ["model", "n"]
    assert "gpt2-tiny" in r.output and "(2 rows)" in r.output


def test_sql_csv(run):
    r = run("sql", "SELECT 1 AS a, 'x' AS b", "--format", "csv")
    assert (r.exit_code, r.output) == (0, "a,b\n1,x\n")


def test_bad_sql(run):
    r = run("sql", "SELEC 1")
    assert r.exit_code == 1
    assert r.output == 'Error: Parser Error: syntax error at or near "SELEC"\n'


def test_write_refused(run, store_root, spec, tmp_path):
    before = spec.digest_tree(store_root)
    r = run("sql", f"COPY (SELECT 1) TO '{tmp_path}/x.csv'")
    assert r.exit_code == 1
    assert r.output == "Error: only read-only SELECT queries are allowed, not a COPY statement\n"
    assert spec.digest_tree(store_root) == before


def test_missing_store(cli, tmp_path):
    r = CliRunner().invoke(cli, ["sql", "SELECT 1", "--store", str(tmp_path / "nope")])
    assert r.exit_code == 1
    assert r.output == f"Error: no selfrepair store at {tmp_path / 'nope'}\n"


def test_query_named(run, spec):
    r = run("query", "layer_summary", "--param", f"p={spec.top_p}", "--format", "json")
    assert r.exit_code == 0, r.output
    assert "sr_ln" in r.output


def test_query_list(run):
    r = run("query", "--list", store=False)
    assert r.exit_code == 0
    for name, q in named.all_queries().items():
        assert f"{name}: {q.title}" in r.output
    assert "--param layer=…  (required)" in r.output


def test_unknown_query(run):
    r = run("query", "layer_sumary")
    assert r.exit_code == 1
    known = ", ".join(named.all_queries())
    assert r.output == f"Error: unknown query 'layer_sumary'; known: {known} (did you mean 'layer_summary' or 'layer_trend'?)\n"


def test_missing_parameter(run):
    r = run("query", "head_tokens", "--param", "head=0")
    assert r.exit_code == 1
    assert r.output == "Error: query 'head_tokens' needs parameter 'layer' (layer of the ablated head)\n"


def test_bad_param_syntax(run):
    r = run("query", "layer_summary", "--param", "p0.1")
    assert r.exit_code == 2
    assert "'p0.1' is not key=value" in r.output


@pytest.mark.parametrize(
    "args",
    [
        ("query",),
        ("query", "layer_summary", "--list"),
        ("query", "layer_summary", "--format", "parquet"),
        ("sql", "SELECT 1", "--format", "parquet"),
        ("export", "layer_summary", "--format", "csv"),
        ("export", "layer_summary", "--output", "x.csv"),
    ],
)
def test_usage_errors(run, args):
    r = run(*args)
    assert r.exit_code == 2
    assert "Traceback" not in r.output


def test_export_parquet_and_latex(run, tmp_path, spec):
    pq_path, tex = tmp_path / "ls.parquet", tmp_path / "ls.tex"
    r = run("export", "breakdown", "--format", "parquet", "--output", str(pq_path), "--param", f"p={spec.top_p}")
    assert r.exit_code == 0, r.output
    assert "ln_share" in pl.read_parquet(pq_path).columns
    r = run("export", "ln_share", "--format", "latex", "--output", str(tex), "--param", f"p={spec.top_p}")
    assert r.exit_code == 0, r.output
    assert r"\toprule" in tex.read_text() and r"ln\_share\_clipped" in tex.read_text()


def test_export_rejects_table_format(run, tmp_path):
    r = run("export", "breakdown", "--format", "table", "--output", str(tmp_path / "x"))
    assert r.exit_code == 2


@pytest.mark.parametrize("command", ["sql", "query", "export"])
def test_help_has_example(cli, command):
    r = CliRunner().invoke(cli, [command, "--help"])
    assert r.exit_code == 0 and "Example:" in r.output
