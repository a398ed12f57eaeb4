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
