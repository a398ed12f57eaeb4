"""The `selfrepair` command line: thin wrappers over the Python API.

Each command parses options, calls one public function and formats the result. Our
typed errors become one `Error: …` line and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="selfrepair")
def main() -> None:
    """An activation warehouse for self-repair in language models.

    Ingest a model once, then ask every self-repair question with SQL.

    Example:

        selfrepair ingest && selfrepair query layer_summary
    """
    from selfrepair.cli_common import partial_warnings_as_lines

    partial_warnings_as_lines()


def _register() -> None:
    # Commands live beside the layer they wrap; importing them here keeps start-up cheap
    # (torch is imported only inside `ingest` when it runs).
    from selfrepair import cli_compare, cli_head, cli_ingest, cli_query, cli_report, cli_serve, cli_store

    for module in (cli_ingest, cli_query, cli_store, cli_report, cli_head, cli_compare, cli_serve):
        for command in module.COMMANDS:
            main.add_command(command)


_register()

