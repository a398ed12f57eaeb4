"""`selfrepair verify` and `selfrepair compact`: check a store; merge its shard files for fast reads."""

from __future__ import annotations

import click

from selfrepair.cli_common import friendly_errors, store_option


@click.command()
@store_option
@friendly_errors
def verify(store):
    """Check every shard's checksums, row counts and keys, the Zarr arrays and the identities.

    Prints a report and exits non-zero on any problem.

    Example:

        selfrepair verify --store stores
    """
    from selfrepair.store.verify import verify as run_verify

    report = run_verify(store)
    for line in report.lines():
        click.echo(line)
    if not report.ok:
        n = sum(len(p) for p in report.problems.values())
        raise click.ClickException(f"verify found {n} problem(s) in {store}")


@click.command()
@store_option
@friendly_errors
def compact(store):
    """Rewrite each table's shard files into one large file sorted by its key.

    Takes the writer lock; one commit swaps the files, so readers see the old files or
    the new ones, and a kill leaves a readable store. Resume, extension and verify keep
    working. Reopen a store opened before it ran.

    Example:

        selfrepair compact --store stores
    """
    from selfrepair.store.compact import compact as run_compact

    for result in run_compact(store):
        click.echo(result.line())


COMMANDS = [verify, compact]
