"""`selfrepair head` (a page per unit: head, group, ATTN, MLP, BLOCK) and `selfrepair info` (what the store holds)."""

from __future__ import annotations

from pathlib import Path

import click

from selfrepair.cli_common import friendly_errors, open_store, store_option, strict_option


@click.command("head")
@click.argument("label")
@store_option
@click.option("--model", default=None, help="Model folder (default: the only one in the store).")
@click.option("--ablation", default=None, help="Ablation kind (default: resample when ingested).")
@click.option("--sample", default=0, show_default=True, type=int, help="Resample draw.")
@click.option("--p", "p", type=float, default=None, help="Top-p fraction of tokens (default: the ingest's top_p).")
@click.option("--tokens", "n_tokens", default=10, show_default=True, type=click.IntRange(1),
              help="Top tokens shown in their text.")
@click.option("--given", default=None, metavar="UNIT",
              help="A condition (label or group name): the page of LABEL ablated on top of it.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the page as one self-contained HTML file (it links the units it names to "
                   "LABEL.html files beside it, where they exist).")
@strict_option
@friendly_errors
def head(label, store, model, ablation, sample, p, n_tokens, given, html_path, strict):
    """Everything about one unit: its top tokens in their text, its self-repair and the split
    into heads, MLPs and LayerNorm, the components outside it that repair it or work against
    it, its anti-erasure neurons, where it attends (heads), and the spread across resample draws.

    LABEL is a head (L26H6), a group (L9H6+L9H9 or its name), ATTN9, MLP9 or BLOCK9.

    Example:

        selfrepair head L26H6 --html L26H6.html

        selfrepair head MLP27

        selfrepair head L9H6 --given L9H9
    """
    from selfrepair.analysis.head_page import build_head_page, html, text
    from selfrepair.analysis.page_html import FileLinks
    from selfrepair.queries.output import check_output_path

    if html_path is not None:  # before any work: a read-only command never writes into a store, any store
        check_output_path(html_path, store)
    with open_store(store, strict) as s:
        page = build_head_page(s, label, model=model, ablation=ablation, p=p, sample=sample, n_tokens=n_tokens,
                               given=given)
    click.echo(text(page))
    if html_path is not None:
        target = html_path.resolve()
        try:
            # Links to the pages of the units it names, where they were written beside it as LABEL.html.
            target.write_text(html(page, FileLinks(target.parent)), encoding="utf-8")
        except OSError as e:
            raise click.ClickException(f"cannot write {html_path}: {e.strerror or e}") from None
        click.echo(f"wrote {html_path}")


@click.command("info")
@store_option
@strict_option
@friendly_errors
def info(store, strict):
    """What each model of the store holds: ablations, draws, heads, other units (counts per kind),
    named groups with their members, conditions, tokens, top_p, arrays.

    The same facts are the `inventory` and `stored_units` SQL views (`unit_catalog` query).

    Example:

        selfrepair info --store stores
    """
    from selfrepair.analysis.units import StoredUnits, info_lines

    with open_store(store, strict) as s:
        for inv in s.inventories:
            for line in info_lines(inv, StoredUnits.of(s, inv.model)):
                click.echo(line)
            for line in s.coverage[inv.model].lines():  # "  partial: resample: 124 of 310 tokens; …"
                click.echo(line)


COMMANDS = [head, info]
