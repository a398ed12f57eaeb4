"""`selfrepair report`: a thin wrapper over `selfrepair.analysis.report.build_report`."""

from __future__ import annotations

from pathlib import Path

import click

from selfrepair.cli_common import friendly_errors, open_store, store_option, strict_option
from selfrepair.store.labels import parse_head
from selfrepair.store.schema import ABLATION_KINDS


class HeadsType(click.ParamType):
    """A comma-separated list of head labels, e.g. `L9H11,L10H2`."""

    name = "L9H11,…"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        heads = []
        for part in (p for p in value.split(",") if p.strip()):
            try:
                heads.append(parse_head(part))
            except ValueError as e:
                self.fail(str(e), param, ctx)
        if not heads:
            self.fail("give at least one head label like L9H11", param, ctx)
        return tuple(dict.fromkeys(heads))


@click.command("report")
@store_option
@click.option("--models", default=None, help="Comma-separated model names (default: every model in the store).")
@click.option("--heads", type=HeadsType(), default=None,
              help="Heads for the per-head figures (default: the four with the largest top-p% DE in the last "
                   "third of the layers).")
@click.option("--ablation", type=click.Choice(ABLATION_KINDS), default=None,
              help="Ablation type (default: resample when ingested).")
@click.option("--p", "p", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Top-p fraction of tokens per head (default: the ingest's top_p).")
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), default=Path("report"),
              show_default=True, help="Folder for report.html, figures/ and tables/.")
@strict_option
@friendly_errors
def report(store: Path, models: str | None, heads, ablation: str | None, p: float | None, output: Path,
           strict: bool) -> None:
    """Write an HTML report with every figure and paper table.

    Writes OUTPUT/report.html (self-contained), every figure as PNG and PDF under
    OUTPUT/figures/ and every table as CSV and LaTeX under OUTPUT/tables/. Each figure
    and table shows the named query and parameters that produced it.

    Example:

        selfrepair report --store stores --heads L9H11,L10H2 --output report
    """
    from selfrepair.analysis.report import build_report
    from selfrepair.queries.output import check_output_path

    check_output_path(output / "report.html", store)  # a read-only command never writes into a store
    names = [m.strip() for m in models.split(",") if m.strip()] if models else None
    if models is not None and not names:
        raise click.UsageError("--models needs at least one model name")
    with open_store(store, strict) as s:
        result = build_report(s, output, models=names, heads=heads, ablation=ablation, p=p)
    drawn = sum(1 for f in result.figures if f.png is not None)
    paper = [f.beside for f in result.figures if f.beside is not None]
    click.echo(f"wrote {result.path} ({drawn} figures, {len(result.figures) - drawn} not drawn; beside them "
               f"{sum(1 for f in paper if f.png is not None)} with the authors' statistic, "
               f"{sum(1 for f in paper if f.png is None)} not drawn; {len(result.tables)} tables)")


COMMANDS = [report]
