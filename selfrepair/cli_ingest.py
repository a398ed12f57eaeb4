"""`selfrepair ingest`: the one command that needs a model (and ideally a GPU)."""

from __future__ import annotations

import re

import click

from selfrepair.cli_common import friendly_errors, store_option
from selfrepair.store.schema import ABLATION_KINDS


class HeadsType(click.ParamType):
    """`all` or a comma list of `L{layer}` / `L{layer}H{head}` labels (ranges are checked against the model)."""

    name = "HEADS"
    _part = re.compile(r"^L[0-9]+(H[0-9]+)?$", re.IGNORECASE)

    def convert(self, value, param, ctx):
        if value.strip().lower() == "all":
            return "all"
        parts = [p.strip() for p in value.split(",")]
        bad = [p for p in parts if not self._part.match(p)]
        if bad or not parts:
            self.fail(f"cannot parse {bad[0] if bad else value!r}; use 'all' or labels like L9H11,L10", param, ctx)
        return ",".join(p.upper() for p in parts)


class SrHeadsType(click.ParamType):
    """`none`, `all`, `penultimate` or head labels (ranges are checked against the model)."""

    name = "HEADS"

    def convert(self, value, param, ctx):
        word = value.strip().lower()
        if word in ("none", "all", "penultimate"):
            return word
        parts = [p.strip() for p in value.split(",")]
        bad = [p for p in parts if not HeadsType._part.match(p)]
        if bad or not parts:
            self.fail(f"cannot parse {bad[0] if bad else value!r}; use none, all, penultimate or labels like L10H3,L11",
                      param, ctx)
        return ",".join(p.upper() for p in parts)


class AblationsType(click.ParamType):
    """A comma list of ablation kinds."""

    name = "KINDS"

    def convert(self, value, param, ctx):
        kinds = tuple(k.strip() for k in value.split(",") if k.strip())
        for k in kinds:
            if k not in ABLATION_KINDS:
                self.fail(f"unknown ablation type {k!r}; choose from {', '.join(ABLATION_KINDS)}", param, ctx)
        if not kinds:
            self.fail("no ablation type given", param, ctx)
        return kinds


class ArraysType(click.ParamType):
    """`all`, `none` or a comma list of Zarr array names (`resid` is resid_pre and resid_final)."""

    name = "ARRAYS"

    def convert(self, value, param, ctx):
        from selfrepair.store.estimate import select_arrays

        if isinstance(value, tuple):
            return value
        try:
            return select_arrays(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


@click.command()
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Registry short name (pythia-410m, gpt2-small, smollm2-135m, …), Hugging Face id or local folder.")
@click.option("--revision", default=None, help="Hugging Face revision (branch, tag or commit) of the weights.")
@click.option("--tokens", type=int, default=1016, show_default=True, help="Predictions to store (whole rows).")
@click.option("--seq-len", type=int, default=128, show_default=True, help="Tokens per row, BOS included.")
@click.option("--batch-size", type=int, default=4, show_default=True,
              help="Rows per batch: the unit of resample pairing, mean ablation and shards.")
@click.option("--corpus", default=None, help="'embedded', a .txt/.jsonl/.parquet file or folder, or a dataset id. "
              "Default: embedded for the embedded/local models, NeelNanda/pile-10k otherwise.")
@click.option("--ablations", type=AblationsType(), default="resample", show_default=True,
              help="Comma list of resample, mean, zero.")
@click.option("--resamples", type=click.IntRange(min=1), default=1, show_default=True,
              help="Resample draws; draw 0 is the paper's next-batch rule, others are seeded.")
@click.option("--heads", type=HeadsType(), default="all", show_default=True, help="'all' or e.g. L9H11,L10.")
@click.option("--top-p", type=float, default=0.02, show_default=True,
              help="Fraction of each head's tokens (by clean DE) with repair and neuron detail.")
@click.option("--neurons-top-k", type=click.IntRange(min=0), default=50, show_default=True,
              help="Final-MLP neurons kept at each end of the signed change in DE (top k and bottom k) per "
              "head and detail token; per-token sums over all neurons are stored too.")
@click.option("--sr-mlps-neurons", type=SrHeadsType(), default="none", show_default=True,
              help="Heads whose top-p% tokens by sr_mlps (d_de_mlps) also get neuron detail, as the paper's "
              "neuron figures pick them: none, all, penultimate (every head of layer n_layers-2) or e.g. L10H3,L11. "
              "In-process executor only.")
@click.option("--attention-top-k", type=click.IntRange(min=0), default=8, show_default=True,
              help="Attention sources kept per head and top token (the largest clean attention weights).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Precision of the sweep's matrix products (on the change from the clean run); the clean pass, residual stream, norms "
              "and differences stay float32.")
@click.option("--engine", type=click.Choice(["fast", "reference"]), default="fast", show_default=True,
              help="fast: FLOP-minimal sweep; reference: one full hooked forward per head.")
@click.option("--heads-per-pass", type=click.IntRange(min=1), default=None,
              help="Heads batched into one patched pass (default: from free memory).")
@click.option("--activations", type=ArraysType(), default=None,
              help="Zarr arrays to keep: all (default), none, or a comma list of resid_pre, resid_final, "
              "resid, z, norm_scales, mlp_post_final.")
@click.option("--no-activations", is_flag=True, help="Same as --activations none.")
@click.option("--dry-run", is_flag=True,
              help="Load the model, print the plan and the estimated bytes of every table and array; write nothing.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the extra resample draws.")
@click.option("--overwrite", is_flag=True, help="Replace a model folder ingested with another configuration.")
@click.option("--quiet", "-q", is_flag=True, help="No plan, progress bars or summary.")
@click.option("--executor", type=click.Choice(["inprocess", "ray"]), default="inprocess", show_default=True,
              help="inprocess: this process computes everything; ray: a pool of Ray actors (one per GPU) computes "
              "the units and this process commits them (needs selfrepair[ray]).")
@click.option("--ray-address", default=None,
              help="With --executor ray: the cluster to join, 'auto' or HOST:PORT (default: a Ray of this machine).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="With --executor ray: actors to start (default: one per GPU, or one on the CPUs).")
@click.option("--preset", type=click.Choice(["paper"]), default=None,
              help="paper: the authors' setup (batches of 30, partial batch dropped, next-batch resample, "
              "TransformerLens tokenize_and_concatenate rows, seq-len 128, top-p 0.02, Llama unfolded). "
              "An explicit flag that contradicts it is refused.")
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
    from selfrepair.ingest.config import IngestConfig
    from selfrepair.ingest.runner import Ingest

    if opts.pop("no_activations"):
        if opts["activations"] not in (None, ()):
            raise click.UsageError("--no-activations contradicts --activations " + ",".join(opts["activations"]))
        opts["activations"] = ()
    if opts["activations"] is None:
        opts["activations"] = True
    if opts["executor"] != "ray":
        given = [f for f, k in (("--ray-address", "ray_address"), ("--workers", "workers")) if opts[k] is not None]
        if given:
            raise click.UsageError(f"{' and '.join(given)} only apply with --executor ray")
    _check_preset(click.get_current_context(), opts)
    cfg = IngestConfig(**opts)
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
    summary = Store.open(cfg.store).query("layer_summary", p=cfg.top_p, ablation=cfg.ablations[0], sample=0)
    summary = summary.filter(summary["model"] == result.model_store.name)
    click.echo(f"Per-layer self-repair over each head's top {cfg.top_p:g} tokens ({cfg.ablations[0]} ablation):")
    write_output(summary, "table", None)


def _check_preset(ctx: click.Context, opts: dict) -> None:
    """Refuse a flag given on the command line that contradicts --preset (one that agrees is fine)."""
    from click.core import ParameterSource

    from selfrepair.ingest.presets import preset_settings

    for key, value in preset_settings(opts.get("preset")).items():
        if key in opts and ctx.get_parameter_source(key) == ParameterSource.COMMANDLINE and opts[key] != value:
            flag = "--" + key.replace("_", "-")
            raise click.UsageError(f"{flag} {opts[key]} contradicts --preset {opts['preset']} ({flag} {value})")


COMMANDS = [ingest]
