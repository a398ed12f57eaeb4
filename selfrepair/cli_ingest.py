"""`selfrepair ingest`: the one command that needs a model (and ideally a GPU)."""

from __future__ import annotations

import dataclasses

import click

from selfrepair.cli_common import friendly_errors, store_option
from selfrepair.errors import SettingConflict
from selfrepair.ingest.config import IngestConfig


class _Parsed(click.ParamType):
    """An option whose text an IngestConfig field's `parse` reads (its ValueError becomes click's one line)."""

    def __init__(self, parse, name: str):
        self.parse, self.name = parse, name

    def convert(self, value, param, ctx):
        try:
            if param is not None and param.multiple:  # click converts each value; the parse reads a tuple
                return self.parse((value,))[0]
            return self.parse(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def _option(f: dataclasses.Field):
    """The `selfrepair ingest` option of one IngestConfig field, from its `setting(...)` metadata.

    The option's default is only shown: `ingest` passes IngestConfig the options given, and the
    config owns the defaults, the preset and every check.
    """
    meta = f.metadata
    default = meta.get("unset", f.default)
    decls = meta.get("flag", ("--" + f.name.replace("_", "-"),))
    kw: dict = {"help": meta.get("help")}
    if meta.get("multiple"):
        kw["multiple"] = True
    if "parse" in meta:
        kw["type"] = _Parsed(meta["parse"], meta["metavar"])
    elif isinstance(default, bool):
        return click.option(*decls, f.name, is_flag=True, **kw)
    elif "choices" in meta:
        kw["type"] = click.Choice(meta["choices"])
    elif "min" in meta:
        kw["type"] = click.IntRange(min=meta["min"])
    elif default is not None:
        kw["type"] = type(default)
    if default not in (None, ()) and meta.get("show_default", True):
        kw.update(default=",".join(default) if isinstance(default, tuple) else default, show_default=True)
    return click.option(*decls, f.name, **kw)


def _given(ctx: click.Context, opts: dict) -> dict:
    """The generated options given on the command line, and every other option (`--store` has its own default)."""
    from click.core import ParameterSource

    generated = {f.name for f in dataclasses.fields(IngestConfig) if f.metadata.get("cli", True)}
    return {k: v for k, v in opts.items() if k not in generated or ctx.get_parameter_source(k) != ParameterSource.DEFAULT}


def config_options(command):
    """Every IngestConfig field with a CLI option, in field order (`--no-activations` after `--activations`)."""
    for f in reversed(dataclasses.fields(IngestConfig)):
        if not f.metadata.get("cli", True):
            continue
        if f.name == "activations":
            command = click.option("--no-activations", is_flag=True, help="Same as --activations none.")(command)
        command = _option(f)(command)
    return command


@click.command()
@config_options
@store_option
@friendly_errors
def ingest(**opts):
    """Ingest a model: clean pass, ablation sweep, store, then print a per-layer summary.

    Re-running the same command resumes after a crash; more --tokens or --heads append.

    Example:

        selfrepair ingest                       # embedded SmolLM2-135M on the embedded corpus

        selfrepair ingest --model pythia-410m --tokens 1000000 --device cuda

        selfrepair ingest --model pythia-410m --tokens 1000000 --activations z --dry-run

        selfrepair ingest --model pythia-410m --tokens 1000000 --executor ray --ray-address auto

        selfrepair ingest --model gpt2-small --preset paper --tokens 381000

        selfrepair ingest --model pythia-410m --tokens 1000000 --sr-mlps-neurons penultimate
    """
    from selfrepair.ingest.runner import Ingest

    opts = _given(click.get_current_context(), opts)
    if opts.pop("no_activations"):
        if "activations" in opts:
            raise click.UsageError("--no-activations contradicts --activations " + ",".join(opts["activations"]))
        opts["activations"] = ()
    try:
        cfg = IngestConfig(**opts)
    except SettingConflict as e:
        raise click.UsageError(e.flags) from None
    result = Ingest(cfg, log=lambda *a: click.echo(*a, err=True)).run()
    if cfg.dry_run:
        click.echo("\n".join(result.estimate.lines()))
        return
    if cfg.quiet:
        return
    from selfrepair.queries.output import write_output
    from selfrepair.queries.store import Store

    secs = result.seconds
    click.echo(
        f"stored {result.n_tokens} tokens of {result.model} in {result.model_store.path} "
        f"({result.shards_written} shards written, {result.shards_skipped} already there) in "
        f"{secs['total']:.1f} s (load {secs['load']:.1f}, clean {secs['clean']:.1f}, ablation {secs['ablation']:.1f}"
        f"{', sr_mlps neurons ' + format(secs['sr_neurons'], '.1f') if 'sr_neurons' in secs else ''})",
        err=True,
    )
    store = Store.open(cfg.store)
    if cfg.counterfactuals:
        _overflow_lines(store, result.model_store.name)
    summary = store.query("layer_summary", p=cfg.top_p, ablation=cfg.ablations[0], sample=0)
    # The headline means, and self-repair's 95% interval (bootstrap over rows; every mean's is in the query).
    summary = summary.filter(summary["model"] == result.model_store.name).select(
        "model", "layer", "n_heads", "n_tokens", "de", "d_logit", "sr", "sr_ln", "sr_ci_low", "sr_ci_high")
    click.echo(f"Per-layer self-repair over each head's top {cfg.top_p:g} tokens ({cfg.ablations[0]} ablation):")
    write_output(summary, "table", None)


def _overflow_lines(store, model: str) -> None:
    """One line per counterfactual with re-runs that overflowed float32 (left out, never stored)."""
    import polars as pl

    from selfrepair.queries import named

    # The query's SQL itself: another model of the store may have no re-runs (the named query refuses that).
    cov = store.sql(named.get_query("counterfactual_coverage").sql).filter(pl.col("model") == model)
    cov = cov.group_by("counterfactual").agg(pl.col("n_top").sum(), pl.col("n_missing").sum()).sort("counterfactual")
    for name, top, missing in cov.select("counterfactual", "n_top", "n_missing").iter_rows():
        if missing:
            click.echo(f"{name}: {missing:,} of {top:,} top-token re-runs overflowed float32 and are not stored "
                       "(query counterfactual_coverage; repair_channels leaves those tokens out)", err=True)


COMMANDS = [ingest]
