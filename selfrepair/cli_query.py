"""`selfrepair sql`, `query` and `export`: thin wrappers over `Store.sql` / `Store.query`.

Import `selfrepair.cli` (not this module) first: cli.py registers these commands.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from selfrepair.cli_common import friendly_errors, open_store, store_option, strict_option
from selfrepair.errors import QueryError
from selfrepair.queries import named
from selfrepair.queries.output import DEFAULT_MAX_ROWS, FORMATS, write_result

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


def max_rows_option(f):
    return click.option("--max-rows", type=click.IntRange(min=0), default=DEFAULT_MAX_ROWS, show_default=True,
                        help="Most rows fetched for table, json, markdown and latex (0: no cap); csv and "
                             "parquet stream every row.")(f)


class SqlTextCommand(click.Command):
    """A command whose SQL argument may start with a `--` comment, as every named query file does.

    click would read `-- Title\nSELECT 42` as an unknown option, so an argument that
    starts with `--`, names none of the command's options and holds whitespace is moved
    behind a `--`.
    """

    def parse_args(self, ctx, args):
        known = {o for p in self.get_params(ctx) for o in (*p.opts, *p.secondary_opts)}
        texts, rest, i = [], [], 0
        while i < len(args):
            arg = args[i]
            if arg == "--":
                texts += args[i + 1:]
                break
            # Whitespace: a comment before SQL; a bare `--fromat` stays, for click's "No such option".
            if arg.startswith("--") and arg.split("=", 1)[0] not in known and any(c.isspace() for c in arg):
                texts.append(arg)
            else:
                rest.append(arg)
            i += 1
        return super().parse_args(ctx, rest + (["--", *texts] if texts else []))


def param_option(f):
    return click.option("--param", "-p", "params", type=ParamType(), multiple=True,
                        help="Query parameter as key=value; repeatable.")(f)


def _check_output(fmt: str, output: Path | None) -> None:
    if fmt == "parquet" and output is None:
        raise click.UsageError("--format parquet needs --output FILE")


def _run(store: Path, text: str | None, params, fmt: str, output: Path | None, max_rows: int,
         name: str | None = None, limit: int | None = None, sort: str | None = None, desc: bool = False,
         strict: bool = False) -> None:
    from selfrepair.queries.store import Rows

    caption = label = None
    with open_store(store, strict) as s:
        if name is not None:
            from selfrepair.analysis.units import unit_params

            # A unit's query: the stored label (a group's name), or one line naming what is stored.
            values = unit_params(s, named.get_query(name), dict(params))
            text, params = s.named_sql(name, Rows(limit, sort, desc), **values)
            caption, label = named.get_query(name).title, f"tab:{name}"  # a LaTeX table's caption and label
        elif params:
            params = {k: named.coerce(v) for k, v in params}
        note = write_result(s, text, params or None, fmt, output, max_rows or None, caption, label)
    if note:
        click.echo(note, err=True)


def shape_options(f):
    """`--limit`, `--sort` and `--desc` for named queries."""
    f = click.option("--desc", is_flag=True, help="With --sort: largest first.")(f)
    f = click.option("--sort", default=None, metavar="COLUMN", help="Sort the result by this column.")(f)
    return click.option("--limit", type=click.IntRange(min=0), default=None, help="Keep the first N rows.")(f)


def _run_named(store: Path, name: str, params: tuple[tuple[str, str], ...], fmt: str, output: Path | None,
               max_rows: int, strict: bool = False, **shape) -> None:
    named.get_query(name)  # unknown name fails before opening the store
    _run(store, None, params, fmt, output, max_rows, name=name, strict=strict, **shape)


MAX_QUERY_BYTES = 1 << 20  # 1 MiB: far beyond any hand-written query; /dev/zero is refused, not read


def _sql_text(text: str | None, file: Path | None) -> str:
    """The query from the argument, `-` (stdin) or `--file`: at most MAX_QUERY_BYTES of UTF-8."""
    if file is not None:
        if text is not None:
            raise click.UsageError("give the query as TEXT or --file, not both")
        try:
            with open(file, "rb") as f:
                return _bounded_text(f, f"--file {file}")
        except OSError as e:
            raise QueryError(f"cannot read --file {file}: {e.strerror or e}") from None
    if text is None:
        raise click.UsageError("give the query as TEXT, - (read stdin) or --file FILE")
    if text == "-":
        return _bounded_text(sys.stdin.buffer, "stdin")
    return text


def _bounded_text(f, what: str) -> str:
    """Read at most MAX_QUERY_BYTES + 1 bytes (memory stays flat whatever `f` is) and decode them."""
    data = f.read(MAX_QUERY_BYTES + 1)
    if len(data) > MAX_QUERY_BYTES:
        raise QueryError(f"the query from {what} is longer than {MAX_QUERY_BYTES} bytes (1 MiB); "
                               "a query is text, not data")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QueryError(f"the query from {what} is not valid UTF-8 (byte 0x{data[e.start]:02X} "
                               f"at byte {e.start + 1})") from None


@click.command("sql", cls=SqlTextCommand)
@click.argument("text", required=False)
@click.option("--file", "file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Read the query from this .sql file.")
@param_option
@store_option
@output_options(FORMATS, "table")
@max_rows_option
@strict_option
@friendly_errors
def sql(text: str | None, file: Path | None, params, store: Path, fmt: str, output: Path | None,
        max_rows: int, strict: bool) -> None:
    """Run one read-only SELECT (or PIVOT) over the store's views.

    TEXT may be `-` to read the query from stdin, or use --file. `$name` placeholders are
    bound from --param name=value.

    Views: tokens, head_effects, mlp_effects, ablation_effects, ablation_top,
    resample_sources, repair_sources, neuron_effects, neuron_totals, attention_top,
    condition_tokens, head_top_tokens, models, inventory, stored_units, unit_members,
    self_repair; macros top_tokens(p), unit_top_tokens(p), self_repair_top(p), token_context(n),
    and the bootstrap's boot_rows(), boot_weights(seed, n_boot), boot_row_weights(seed, n_boot).
    Ablation rows carry unit (L9H6, a group's label, ATTN9, MLP9, BLOCK9), unit_kind and
    condition ('' for a unit ablated alone).

    Example:

        selfrepair sql "SELECT model, layer, avg(sr) FROM self_repair GROUP BY ALL"

        selfrepair sql --file queries/sql/layer_summary.sql -p p=0.02 -p ablation=resample -p sample=0
    """
    _check_output(fmt, output)
    _run(store, _sql_text(text, file), params, fmt, output, max_rows, strict=strict)


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
@max_rows_option
@shape_options
@strict_option
@friendly_errors
def query(name: str | None, list_: bool, params, store: Path, fmt: str, output: Path | None, max_rows: int,
          limit: int | None, sort: str | None, desc: bool, strict: bool) -> None:
    """Run a named query from queries/sql/, or list them.

    Example:

        selfrepair query layer_summary --param p=0.02 --param ablation=resample

        selfrepair query backup_heads -p head=L26H6 --sort d_de --limit 5

        selfrepair query unit_top_self_repair -p unit=MLP27 -p condition=L9H9

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
    _run_named(store, name, params, fmt, output, max_rows, strict, limit=limit, sort=sort, desc=desc)


@click.command("export")
@click.argument("name")
@param_option
@store_option
@output_options(EXPORT_FORMATS, None)
@max_rows_option
@shape_options
@strict_option
@friendly_errors
def export(name: str, params, store: Path, fmt: str, output: Path | None, max_rows: int,
           limit: int | None, sort: str | None, desc: bool, strict: bool) -> None:
    """Write a named query's result to a file, for paper tables.

    Example:

        selfrepair export ln_share --format latex --output tables/ln_share.tex --param p=0.02
    """
    if output is None:
        raise click.UsageError("export needs --output FILE")
    _run_named(store, name, params, fmt, output, max_rows, strict, limit=limit, sort=sort, desc=desc)


COMMANDS = [sql, query, export]
