"""`selfrepair sql`, `query` and `export`: thin wrappers over `Store.sql` / `Store.query`.

Import `selfrepair.cli` (not this module) first: cli.py registers these commands.
"""

from __future__ import annotations

from pathlib import Path

import click

from selfrepair.cli_common import friendly_errors, store_option
from selfrepair.queries import named
from selfrepair.queries.output import FORMATS, write_output

EXPORT_FORMATS = ("latex", "markdown", "csv", "parquet")


class ParamType(click.ParamType):
    """`key=value` for `--param`, e.g. `p=0.05`; the value is typed by the query."""

    name = "key=value"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        key, sep, val = value.partition("=")
        if not sep or not key.strip():
            self.fail(f"{value!r} is not key=value", param, ctx)
        return key.strip(), val


def output_options(formats: tuple[str, ...], default: str | None):
    """`--format` and `--output`, shared by the three commands."""

    def decorate(f):
        f = click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
                         help="Write here instead of stdout.")(f)
        # Pass no default at all when the format is required (click treats default=None as given).
        extra = {"default": default, "show_default": True} if default else {"required": True}
        return click.option("--format", "-f", "fmt", type=click.Choice(formats),
                            help="Output format (parquet needs --output).", **extra)(f)

    return decorate


def param_option(f):
    return click.option("--param", "-p", "params", type=ParamType(), multiple=True,
                        help="Query parameter as key=value; repeatable.")(f)


def _check_output(fmt: str, output: Path | None) -> None:
    if fmt == "parquet" and output is None:
        raise click.UsageError("--format parquet needs --output FILE")


def _run_named(store: Path, name: str, params: tuple[tuple[str, str], ...]):
    from selfrepair.queries.store import Store

    query = named.get_query(name)  # unknown name fails before opening the store
    with Store.open(store) as s:
        return s.query(query.name, **dict(params))


@click.command("sql")
@click.argument("text")
@store_option
@output_options(FORMATS, "table")
@friendly_errors
def sql(text: str, store: Path, fmt: str, output: Path | None) -> None:
    """Run one read-only SELECT over the store's views.

    Views: tokens, head_effects, mlp_effects, ablation_effects, resample_sources,
    repair_sources, neuron_effects, models, self_repair; macros top_tokens(p) and
    self_repair_top(p).

    Example:

        selfrepair sql "SELECT model, layer, avg(sr) FROM self_repair GROUP BY ALL"
    """
    from selfrepair.queries.store import Store

    _check_output(fmt, output)
    with Store.open(store) as s:
        df = s.sql(text)
    write_output(df, fmt, output)


def _list_queries() -> None:
    for q in named.all_queries().values():
        click.echo(f"{q.name}: {q.title}")
        click.echo(f"    {q.description}")
        for p in q.params:
            default = "required" if p.required else f"default {p.default}"
            click.echo(f"    --param {p.name}=…  ({default}) {p.help}")


@click.command("query")
@click.argument("name", required=False)
@click.option("--list", "list_", is_flag=True, help="List the named queries with their parameters.")
@param_option
@store_option
@output_options(FORMATS, "table")
@friendly_errors
def query(name: str | None, list_: bool, params, store: Path, fmt: str, output: Path | None) -> None:
    """Run a named query from queries/sql/, or list them.

    Example:

        selfrepair query layer_summary --param p=0.02 --param ablation=resample

        selfrepair query --list
    """
    if list_:
        if name or params:
            raise click.UsageError("--list takes no query name or --param")
        _list_queries()
        return
    if not name:
        raise click.UsageError("give a query NAME, or --list")
    _check_output(fmt, output)
    write_output(_run_named(store, name, params), fmt, output)


@click.command("export")
@click.argument("name")
@param_option
@store_option
@output_options(EXPORT_FORMATS, None)
@friendly_errors
def export(name: str, params, store: Path, fmt: str, output: Path | None) -> None:
    """Write a named query's result to a file, for paper tables.

    Example:

        selfrepair export ln_share --format latex --output tables/ln_share.tex --param p=0.02
    """
    if output is None:
        raise click.UsageError("export needs --output FILE")
    write_output(_run_named(store, name, params), fmt, output)


COMMANDS = [sql, query, export]
