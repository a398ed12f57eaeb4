"""`selfrepair compare-paper`: a store against the paper's published per-head numbers (or any reference CSV);
`selfrepair compare`: two stored models side by side.

Import `selfrepair.cli` (not this module) first: cli.py registers the command.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import click
import polars as pl

from selfrepair.cli_common import DEFAULT_STORE, friendly_errors, store_option
from selfrepair.queries.output import write_output

EXIT_DISAGREES, EXIT_BAD_INPUT = 1, 2
FORMATS = ("table", "csv", "json", "markdown")


def bad_input_exits_2(f):
    """Our typed errors as one `Error:` line, exiting 2 (exit 1 means "some head disagrees")."""
    wrapped = friendly_errors(f)

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return wrapped(*args, **kwargs)
        except click.ClickException as e:
            e.exit_code = EXIT_BAD_INPUT
            raise

    return wrapper


def _section(title: str, df: pl.DataFrame, fmt: str) -> None:
    click.echo(f"\n## {title}\n" if fmt == "markdown" else f"\n{title}")
    # Six decimals: float32 noise (1e-9) would otherwise fill the table; csv and json keep every digit.
    write_output(df.with_columns(pl.col("store", "paper", "diff").round(6)), fmt)


@click.command("compare-paper")
@store_option
@click.option("--model", default=None, help="Model folder (default: every model of the store the paper has).")
@click.option("--ablation", default="resample", show_default=True, help="Stored ablation compared.")
@click.option("--sample", default=0, show_default=True, type=int, help="Resample draw compared.")
@click.option("--tolerance", default=0.05, show_default=True, type=float,
              help="Largest agreeing difference, in logits.")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="Reference CSV of the documented columns, naming store models by folder, manifest name or "
                   "Hugging Face id (default: the paper's values shipped with selfrepair).")
@click.option("--format", "-f", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="Output format; csv and json give both tables as one, with a `level` column.")
@bad_input_exits_2
def compare_paper(store, model, ablation, sample, tolerance, reference, fmt):
    """Compare the store's self-repair means with the paper's (Rushing & Nanda 2024).

    For each model of the paper (pythia-160m, gpt2-small, pythia-410m, gpt2-medium): per
    layer, the mean over its heads of DE, ablated DE, logit change, self-repair and its
    heads/MLPs/LayerNorm split, over each head's top 2% tokens (and over all tokens where
    the paper gives them), beside the paper's, with the difference; then every head that
    differs by more than the tolerance. Exact agreement needs the paper's rows and pairing
    (`selfrepair ingest --preset paper`). With `--reference FILE.csv` (the same columns, e.g.
    another run's numbers) the models it names are compared instead.

    Exit status: 0 when every head agrees, 1 when some head disagrees, 2 for bad input
    (unknown model, missing or malformed reference file, ablation not stored).

    Example:

        selfrepair compare-paper --model pythia-160m --tolerance 0.05

        selfrepair compare-paper --model gpt2-4l --reference my-run.csv
    """
    from selfrepair.queries.compare_paper import REFERENCE_CSV, compare
    from selfrepair.queries.store import Store

    with Store.open(store) as s:
        result = compare(s, model=model, ablation=ablation, sample=sample, tolerance=tolerance,
                         reference=reference or REFERENCE_CSV)
    n_off = result.heads.select("model", "tokens", "head").n_unique()
    verdict = (f"every head agrees within {result.tolerance:g} logits" if result.agrees else
               f"{n_off} head{'s' if n_off > 1 else ''} disagree by more than {result.tolerance:g} logits")
    summary = [*result.notes, verdict]
    if fmt in ("csv", "json"):
        for line in summary:
            click.echo(line, err=True)  # stdout stays one parsable table
        both = pl.concat([result.layers.with_columns(level=pl.lit("layer")),
                          result.heads.with_columns(level=pl.lit("head"))], how="diagonal")
        write_output(both.select("level", "model", "tokens", "layer", "head", "quantity", "store", "paper", "diff",
                                 "agrees"), fmt)
    else:
        click.echo("\n".join(summary))
        _section("Per layer: mean over the layer's heads (store, paper, store - paper)", result.layers, fmt)
        _section(f"Heads off by more than {result.tolerance:g} logits", result.heads, fmt)
    if not result.agrees:
        click.get_current_context().exit(EXIT_DISAGREES)


COMPARE_FORMATS = ("table", "csv", "json", "markdown", "latex")


@click.command("compare")
@click.argument("model_a")
@click.argument("model_b")
@click.option("--store", "stores", type=click.Path(path_type=Path), multiple=True,
              help="Store root; give it twice for MODEL_B's own store (default: $SELFREPAIR_STORE or ./stores, "
                   "for both).")
@click.option("--by", type=click.Choice(("layer", "head")), default="layer", show_default=True,
              help="Per layer (by relative depth when the shapes differ) or per head (same shape only).")
@click.option("--p", "p", type=float, default=None,
              help="Top fraction of tokens per head (default: MODEL_A's ingest setting).")
@click.option("--ablation", default="resample", show_default=True, help="Stored ablation compared, on both sides.")
@click.option("--sample", default=0, show_default=True, type=int, help="Resample draw compared.")
@click.option("--quantity", default=None, metavar="Q1,Q2",
              help="Comma list of de_clean, de_ablated, d_logit, sr, sr_heads, sr_mlps, sr_ln, ln_ratio (default: all).")
@click.option("--bins", type=int, default=None,
              help="Relative-depth bins for models of different shapes (default: the smaller layer count).")
@click.option("--format", "-f", "fmt", type=click.Choice(COMPARE_FORMATS), default="table", show_default=True,
              help="Output format; the notes go to stderr for csv, json and latex.")
@friendly_errors
def compare_models(model_a, model_b, stores, by, p, ablation, sample, quantity, bins, fmt):
    """Put two stored models side by side, per layer or per head: two models of one store, or one model
    in two stores (`--store A --store B`).

    For each layer (or head) and quantity: MODEL_A's value, MODEL_B's, and their difference
    (B - A); a value is the mean over each head's top p% tokens, a layer's the mean of its
    heads'. Models of different shapes are compared per layer by relative depth
    (layer / (n_layers - 1), binned); a per-head comparison of different shapes is refused.

    Example:

        selfrepair compare gpt2-small schaeff--gpt2-small_LNFree300 --quantity sr,sr_ln

        selfrepair compare pythia-160m@step3000 pythia-160m@step143000 --by head

        selfrepair compare gpt2-small gpt2-small --store run1 --store run2

        selfrepair compare pythia-160m pythia-410m --bins 6
    """
    from selfrepair.queries.compare import Side, compare, parse_quantities
    from selfrepair.queries.store import Store

    if len(stores) > 2:
        raise click.UsageError("--store: at most two (MODEL_A's and MODEL_B's)")
    roots = list(stores) or [Path(os.environ.get("SELFREPAIR_STORE", DEFAULT_STORE))]
    quantities = parse_quantities(quantity)
    with Store.open(roots[0]) as first:
        if len(roots) == 1:
            result = compare(Side(first, model_a), Side(first, model_b), by, p, ablation, sample, quantities, bins)
        else:
            with Store.open(roots[1]) as second:
                result = compare(Side(first, model_a), Side(second, model_b), by, p, ablation, sample, quantities,
                                 bins)
    quiet_stdout = fmt in ("csv", "json", "latex")
    for line in result.notes:
        click.echo(line, err=quiet_stdout)  # csv, json and latex keep stdout one parsable document
    if not quiet_stdout:
        click.echo()
    frame = result.frame
    if fmt != "latex":  # LaTeX rounds each column to one precision itself
        frame = frame.with_columns(pl.col(*result.labels, "diff").round(6))
    a, b = result.labels
    write_output(frame, fmt, caption=f"Self-repair of {a} and {b} per {result.by}.",
                 label=f"tab:compare-{result.by}")


COMMANDS = [compare_paper, compare_models]
