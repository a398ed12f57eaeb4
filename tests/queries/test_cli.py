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


# -- SQL that fits a day's work: files, stdin, parameters, PIVOT, limits, escaped cells --------

def test_sql_from_a_file_stdin_and_with_parameters(cli, store_root, tmp_path):
    f = tmp_path / "q.sql"
    f.write_text("-- Tokens of one model\nSELECT count(*) AS n FROM tokens WHERE model = $m;\n")
    by_file = CliRunner().invoke(cli, ["sql", "--file", str(f), "-p", "m=gpt2-tiny", "--store", str(store_root),
                                       "-f", "csv"])
    assert by_file.exit_code == 0, by_file.output
    assert by_file.output.splitlines() == ["n", "40"]
    by_stdin = CliRunner().invoke(cli, ["sql", "-", "-p", "m=pythia-tiny", "--store", str(store_root), "-f", "csv"],
                                  input=f.read_text())
    assert by_stdin.output.splitlines() == ["n", "30"]
    both = CliRunner().invoke(cli, ["sql", "SELECT 1", "--file", str(f), "--store", str(store_root)])
    assert both.exit_code == 2 and "not both" in both.output


def test_pivot_and_explain_are_allowed_and_the_sandbox_holds(run):
    r = run("sql", "PIVOT (SELECT model, layer, count(*) AS n FROM head_effects GROUP BY ALL) ON layer USING sum(n) "
                   "ORDER BY model", "-f", "csv")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == "model,0,1,2"
    assert run("sql", "EXPLAIN SELECT 1").exit_code == 0
    bad = run("sql", "PIVOT (SELECT 1 AS a) ON a USING count(*); COPY tokens TO 'x.csv'")
    assert bad.exit_code == 1 and _error_line(bad) == "Error: expected exactly one SELECT statement, got 2"


def test_named_query_limit_and_sort(run):
    full = run("query", "layer_summary", "-p", "p=0.1", "-f", "csv")
    top = run("query", "layer_summary", "-p", "p=0.1", "--sort", "sr", "--desc", "--limit", "2", "-f", "csv")
    assert full.exit_code == top.exit_code == 0, top.output
    frame = pl.read_csv(full.stdout.encode())
    want = frame.sort("sr", descending=True).head(2)
    assert pl.read_csv(top.stdout.encode()).equals(want)


def test_newlines_and_tabs_are_escaped_in_text_formats(run):
    for fmt, want in (("table", "a\\nb\\tc"), ("markdown", "a\\nb\\tc"),
                      ("latex", "a\\textbackslash{}nb\\textbackslash{}tc")):  # LaTeX prints \n and \t
        r = run("sql", "SELECT 'a' || chr(10) || 'b' || chr(9) || 'c' AS s", "-f", fmt)
        assert r.exit_code == 0 and want in r.output, (fmt, r.output)
