"""`selfrepair verify`: check a store's files, arrays and identities."""

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


COMMANDS = [verify]
