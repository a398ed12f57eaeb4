"""Options and error handling shared by every command module (they import this, never cli.py)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import click

from selfrepair.errors import SelfRepairError

DEFAULT_STORE = "stores"


def store_option(f):
    """`--store PATH`, shared by every command that reads or writes a store."""
    return click.option(
        "--store",
        "store",
        type=click.Path(path_type=Path),
        default=lambda: os.environ.get("SELFREPAIR_STORE", DEFAULT_STORE),
        show_default=f"$SELFREPAIR_STORE or ./{DEFAULT_STORE}",
        help="Store root (one folder per model inside).",
    )(f)


def friendly_errors(f):
    """Turn our typed errors (and Ctrl-C) into one line and a non-zero exit."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except SelfRepairError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            raise click.ClickException("interrupted") from None

    return wrapper


def strict_option(f):
    """`--strict`, shared by every command that reads a store: a partial store is refused, not warned about."""
    return click.option("--strict", is_flag=True,
                        help="Refuse a partial store (an unfinished ingest; draws or units covering fewer tokens "
                             "than the store) instead of warning on stderr.")(f)


def open_store(path: Path, strict: bool):
    """`Store.open` for a reading command: a partial store refused with `strict` (one `Error:` line), else
    one `warning: partial store: …` line on stderr (the answer still covers the stored tokens)."""
    from selfrepair.queries.store import Store

    store = Store.open(path, strict=strict, warn=False)
    text = store.partial_text()
    if text:
        click.echo(f"warning: {text}", err=True)
    return store


def partial_warnings_as_lines() -> None:
    """Print a `PartialStoreWarning` (from a command that opens its store with `Store.open` itself:
    `compare-paper`, the ingest's closing summary) as one `warning: …` line on stderr, not Python's
    `file:line: Category: …` form; every other warning as before."""
    import warnings

    from selfrepair.errors import PartialStoreWarning

    if getattr(warnings.showwarning, "_selfrepair", False):
        return
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, PartialStoreWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            shown(message, category, filename, lineno, file, line)

    show._selfrepair = True
    warnings.showwarning = show
