"""`selfrepair serve`: browse a store in a web browser (read-only)."""

from __future__ import annotations

import click

from selfrepair.cli_common import friendly_errors, store_option


@click.command("serve")
@store_option
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free port).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but 127.0.0.1/localhost/::1 exposes the store to the network.")
@click.option("--report-figures", default=None, metavar="NAMES",
              help="Comma-separated figures of the served report (default: all; the report is built on first visit).")
@friendly_errors
def serve(store, port, host, report_figures):
    """Browse a store: an index of models and units, every unit's page, the report and a SQL box.

    Read-only: nothing a request does changes the store. Listens on 127.0.0.1 unless --host
    says otherwise; Ctrl-C stops it.

    Example:

        selfrepair serve --store stores --port 8000
    """
    from selfrepair.analysis.serve import ServeConfig, bind, open_store, run, url

    figures = tuple(f.strip() for f in report_figures.split(",") if f.strip()) if report_figures else None
    config = ServeConfig(store, host=host, port=port, report_figures=figures)
    s = open_store(store)
    if config.exposed:
        click.echo(f"Warning: --host {host} exposes the store to the network: anyone who can reach this "
                   "machine can read it (read-only).", err=True)
    sock = bind(config)
    click.echo(f"Serving {store} at {url(config, sock)} (Ctrl-C to stop)")
    try:
        run(config, sock, s)
    finally:
        sock.close()
        s.close()


COMMANDS = [serve]
