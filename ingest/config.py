"""IngestConfig: every setting of one `selfrepair ingest` run, checked on construction.

Building a config never touches the network, the disk or a global seed; sizes that
follow from the settings are properties.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

from selfrepair.errors import ConfigError, SettingConflict
from selfrepair.ingest.counterfactual_rules import parse_counterfactuals
from selfrepair.ingest.presets import PRESETS, preset_settings
from selfrepair.store.heads import HEAD_WORDS, SR_WORDS, normalize_spec, parse_heads  # noqa: F401 - parse_heads re-exported
from selfrepair.store.labels import is_shorthand, normalize_conditions, normalize_units, parse_units
from selfrepair.store.estimate import select_arrays
from selfrepair.store.model_store import model_dirname
from selfrepair.store.schema import ABLATION_KINDS, ARRAY_DTYPES, ARRAYS, OUTPUT_METRICS
from selfrepair.store.top_tokens import top_count

ENGINES = ("fast", "reference")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
EXECUTORS = ("inprocess", "ray")
# How the work is spread changes nothing that is stored: these settings stay out of the
# manifest's config and identity, so either executor resumes or extends the other's store.
_EXECUTION = ("executor", "ray_address", "workers")


def parse_ablations(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """A comma list (or sequence) of ablation kinds, each once, in the order given."""
    kinds = tuple(value.split(",")) if isinstance(value, str) else tuple(value)
    kinds = tuple(dict.fromkeys(k.strip() for k in kinds if k.strip()))
    for kind in kinds:
        if kind not in ABLATION_KINDS:
            raise ConfigError(f"unknown ablation type {kind!r}; choose from {', '.join(ABLATION_KINDS)}")
    if not kinds:
        raise ConfigError("no ablation type given")
    return kinds


def _check_name(value: str, what: str) -> str:
    """A `--model-name` that is a model folder's name already (`store/model_store.model_dirname`), with at most
    one `@`; or a `--revision` without `@` or spaces (a branch such as `refs/pr/1` keeps its `/` on the hub and
    becomes `--` in the folder name)."""
    value = str(value).strip()
    if what == "a revision":
        if not value or "@" in value or any(c.isspace() for c in value):
            raise ValueError(f"{value!r} is not a revision: a branch, tag or commit, without '@' or spaces")
        return value
    if not value or model_dirname(value) != value or value.count("@") > 1 or value.startswith("."):
        raise ValueError(f"{value!r} cannot name a model folder: use letters, digits, '.', '_', '-' and at most "
                         "one '@'")
    return value


def parse_output_metrics(value: str) -> str:
    """`all`, `none`, or a comma list of the output metrics (all four: they share one unembedding pass,
    so they are computed and stored together)."""
    text = str(value).strip()
    if text in ("all", "none"):
        return text
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in OUTPUT_METRICS:
            raise ValueError(f"unknown output metric {name!r}; choose all, none, or {', '.join(OUTPUT_METRICS)}")
    if set(names) != set(OUTPUT_METRICS):
        missing = [n for n in OUTPUT_METRICS if n not in names]
        raise ValueError(f"the output metrics share one pass over the vocabulary and are stored together; "
                         f"name all four (missing {', '.join(missing)}), all or none")
    return "all"


def setting(default=None, help: str | None = None, *, unset=None, choices: tuple | None = None, parse=None,
            min: int | None = None, flag: tuple[str, ...] | None = None, metavar: str | None = None,
            cli: bool = True, show_default: bool = True, multiple: bool = False):
    """A field of IngestConfig with everything `selfrepair ingest` builds its option from.

    Args:
        default: the field's default (None for a preset field: "unset").
        help: the option's help text.
        unset: for a field a preset may fix: the value it takes when neither the caller nor the preset sets it.
        choices: the only values allowed.
        parse: turns text (or an already parsed value) into the field's value; raises ValueError.
        min: the smallest value allowed.
        flag: the option's declarations (default: `--field-name`).
        metavar: the option's value name in `--help`.
        cli: whether `selfrepair ingest` has an option for it.
        show_default: whether `--help` shows the default.
        multiple: the option may be given several times (the field holds a tuple).
    """
    meta = {"help": help, "unset": unset, "choices": choices, "parse": parse, "min": min, "flag": flag,
            "metavar": metavar, "cli": cli, "show_default": show_default, "multiple": multiple or None}
    return field(default=default, metadata={k: v for k, v in meta.items() if v is not None})


def flag_of(name: str) -> str:
    """The `selfrepair ingest` option of an IngestConfig field (`batch_size` -> `--batch-size`)."""
    meta = _FIELDS[name].metadata
    return meta["flag"][0] if "flag" in meta else "--" + name.replace("_", "-")


@dataclass
class IngestConfig:
    """One ingest run.

    Each field's help, choices, range and parser are its `setting(...)`, which `selfrepair ingest`
    turns into its options; `--help` lists them all.

    The preset fields (seq_len, batch_size, top_p, sr_mlps_neurons) default to None, "unset":
    a preset then fixes them, and without one they take their `unset` value. A value given
    that differs from the preset's is refused (SettingConflict), even one equal to the default.
    """

    model: str = setting("smollm2-135m", "Registry short name (pythia-410m, gpt2-small, smollm2-135m, …), "
                         "Hugging Face id or local folder.")
    revision: str | None = setting(None, "Hugging Face revision (branch, tag or commit) of the weights, e.g. a "
                                   "Pythia training checkpoint step1000: stored as its own model, NAME@REV.",
                                   parse=partial(_check_name, what="a revision"), metavar="REV")
    model_name: str | None = setting(None, "The model's folder name in the store (default: the registry name, the "
                                     "id or the folder's name); NAME@REV labels a local checkpoint as revision REV "
                                     "of NAME (e.g. my-model@step1000).", parse=partial(_check_name, what="a name"),
                                     metavar="NAME")
    store: Path = setting(Path("stores"), "Store root; the model gets a folder inside it.", cli=False)
    tokens: int = setting(1016, "Predictions to store (whole rows).")
    seq_len: int | None = setting(help="Tokens per row, BOS included.", unset=128)
    batch_size: int | None = setting(help="Rows per batch: the unit of resample pairing, mean ablation and shards.",
                                     unset=4)
    corpus: str | None = setting(None, "'embedded', a .txt/.jsonl/.parquet file or folder, or a dataset id. "
                                 "Default: embedded for the embedded/local models, NeelNanda/pile-10k otherwise.")
    ablations: tuple[str, ...] = setting(("resample",), "Comma list of resample, mean, zero.", parse=parse_ablations,
                                         metavar="KINDS")
    resamples: int = setting(1, "Resample draws; draw 0 is the paper's next-batch rule, others are seeded.", min=1)
    units: str | None = setting(
        None, "Units to ablate: heads (every head), mlps, attn, blocks (one unit per layer), L9 (its heads), or "
        "labels like L9H6, L9H6+L9H9+L10H0 (a group), ATTN9, MLP9, BLOCK9; name a group with backup=L9H6+L9H9. "
        "Default: heads.", parse=normalize_units, metavar="UNITS", show_default=False)
    heads: str | None = setting(None, "Heads to ablate, as --units: 'all' or e.g. L9H11,L10 (kept as an alias).",
                                parse=partial(normalize_spec, words=HEAD_WORDS), metavar="HEADS")
    given: tuple[str, ...] = setting(
        (), "A condition unit (e.g. L9H9+L9H6): every unit is also ablated on top of it, same ablation and draw. "
        "Repeat for several; the units' unconditioned rows are stored too.", parse=normalize_conditions,
        metavar="UNIT", multiple=True, show_default=False)
    top_p: float | None = setting(help="Fraction of each head's tokens (by clean DE) with repair and neuron detail.",
                                  unset=0.02)
    neurons_top_k: int = setting(50, "Final-MLP neurons kept at each end of the signed change in DE (top k and "
                                 "bottom k) per head and detail token; per-token sums over all neurons are stored too.",
                                 min=0)
    sr_mlps_neurons: str | None = setting(
        help="Heads whose top-p% tokens by sr_mlps (d_de_mlps) also get neuron detail, as the paper's neuron figures "
        "pick them: none, all, penultimate (every head of layer n_layers-2) or e.g. L10H3,L11.",
        unset="none", parse=partial(normalize_spec, words=SR_WORDS), metavar="HEADS")
    attention_top_k: int = setting(8, "Attention sources kept per head and top token (the largest clean attention "
                                   "weights).", min=0)
    counterfactuals: tuple[str, ...] = setting(
        (), "Re-run each unit's ablation on its top-p% tokens with every downstream norm scale (frozen-norms) or "
        "attention pattern (frozen-attention) taken from the baseline run: none, or a comma list of both "
        "(fast engine only).", parse=parse_counterfactuals, metavar="NAMES", show_default=False)
    device: str = setting("auto", choices=DEVICES)
    dtype: str = setting("float32", "Precision of the sweep's matrix products (on the change from the clean run); "
                         "the clean pass, residual stream, norms and differences stay float32.", choices=DTYPES)
    engine: str = setting("fast", "fast: FLOP-minimal sweep; reference: one full hooked forward per head.",
                          choices=ENGINES)
    heads_per_pass: int | None = setting(None, "Units batched into one patched pass (default: the most units "
                                         "sharing a first layer, as free memory allows).",
                                         min=1)
    activations: bool | str | tuple[str, ...] = setting(
        True, "Zarr arrays to keep: all (default), none, or a comma list of resid_pre, resid_final, resid, z, "
        "norm_scales, mlp_post_final.", parse=select_arrays, metavar="ARRAYS", show_default=False)
    activation_dtype: str = setting("float16", "float16 or float32 for the Zarr arrays.", choices=ARRAY_DTYPES,
                                    cli=False)
    output_metrics: str = setting(
        "all", "Output metrics of every ablation row (d_loss, kl, d_entropy, top1_changed; clean and condition "
        "loss and entropy) from the model's full output distribution: all, or none for a cheaper run (the columns "
        "are then absent and read as NULL). The plan states their cost.", parse=parse_output_metrics,
        metavar="all|none")
    dry_run: bool = setting(False, "Load the model, print the plan and the estimated bytes of every table and array; "
                            "write nothing.")
    seed: int = setting(0, "Seed of the extra resample draws.")
    overwrite: bool = setting(False, "Replace a model folder ingested with another configuration.")
    quiet: bool = setting(False, "No plan, progress bars or summary.", flag=("--quiet", "-q"))
    executor: str = setting("inprocess", "inprocess: this process computes everything; ray: a pool of Ray actors "
                            "(one per GPU) computes the units and this process commits them (needs selfrepair[ray]).",
                            choices=EXECUTORS)
    ray_address: str | None = setting(None, "With --executor ray: the cluster to join, 'auto' or HOST:PORT "
                                      "(default: a Ray of this machine).")
    workers: int | None = setting(None, "With --executor ray: actors to start (default: one per GPU, or one on the "
                                  "CPUs).", min=1)
    preset: str | None = setting(None, "paper: the authors' setup (batches of 30, partial batch dropped, next-batch "
                                 "resample, TransformerLens tokenize_and_concatenate rows, seq-len 128, top-p 0.02, "
                                 "Llama unfolded). An explicit flag that contradicts it is refused.",
                                 choices=tuple(PRESETS))

    def __post_init__(self) -> None:
        self.store = Path(self.store)
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None:
                continue
            if "parse" in meta:
                try:
                    value = meta["parse"](value)
                except ValueError as e:
                    raise ConfigError(f"{f.name}: {e}") from None
                setattr(self, f.name, value)
            if "choices" in meta and value not in meta["choices"]:
                if f.name == "preset":
                    raise ConfigError(f"preset: unknown preset {value!r}; choose from {', '.join(meta['choices'])}")
                raise ConfigError(f"{f.name}: {value!r} is not one of {', '.join(meta['choices'])}")
            if "min" in meta and value < meta["min"]:
                raise ConfigError(f"{f.name}: must be {_at_least(meta['min'])}, got {value}")
        self._apply_preset()
        if not self.model or not str(self.model).strip():
            raise ConfigError("model: empty name")
        if self.tokens <= 0:
            raise ConfigError(f"tokens: must be positive, got {self.tokens}")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len: must be at least 2, got {self.seq_len}")
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size: must be positive, got {self.batch_size}")
        if not 0 <= self.seed < 2**63:  # numpy seeds are non-negative; the manifest keeps it as an int64
            raise ConfigError(f"seed: must be in [0, 2**63), got {self.seed}")
        if self.whole_batches:
            need = 2 if "resample" in self.ablations else 1  # resample pairs each batch with another
            if self.n_rows < need * self.batch_size:
                raise ConfigError(
                    f"tokens: preset {self.preset} needs {need} whole batch{'es' if need > 1 else ''} of "
                    f"{self.batch_size} rows{' for resample ablation' if need > 1 else ''} "
                    f"(--tokens {need * self.batch_size * self.preds_per_row}); {self.tokens} tokens make "
                    f"{-(-self.tokens // self.preds_per_row)} rows")
        if not (0 < self.top_p <= 1):
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_tokens < 1:
            # Checked here, before any model loads: an empty top-p% set has no repair or neuron detail.
            raise ConfigError(f"top_p: floor(top_p × tokens) = floor({self.top_p:g} × {self.n_tokens}) = 0 tokens per "
                              f"head; raise --top-p to at least 1/{self.n_tokens} or --tokens to at least "
                              f"{math.ceil(1 / self.top_p)}")
        if self.counterfactuals and self.engine != "fast":
            raise SettingConflict(f"counterfactuals: only with engine fast, got {self.engine}",
                                  f"--counterfactuals runs on the fast engine; --engine {self.engine} cannot run it")
        if self.sr_mlps_neurons != "none" and self.neurons_top_k == 0:
            raise ConfigError("sr_mlps_neurons: needs neuron detail; --neurons-top-k is 0")
        self._refuse_no_ops()
        given = [k for k in ("workers", "ray_address") if getattr(self, k) is not None]
        if self.executor != "ray" and given:
            raise SettingConflict(f"{', '.join(given)}: only with executor ray",
                                  f"{' and '.join(map(flag_of, given))} only apply with --executor ray")

    def _refuse_no_ops(self) -> None:
        """Refuse a setting that would change nothing for this run (issue 22: no silent no-op)."""
        if self.resamples > 1 and "resample" not in self.ablations:
            raise ConfigError(f"resamples: {self.resamples} draws asked, but resample is not among the ablations "
                              f"({','.join(self.ablations)}): the draws would do nothing; add resample to --ablations "
                              "or leave --resamples out")
        if self.engine == "reference" and self.dtype != "float32":
            raise SettingConflict(f"dtype: {self.dtype} does nothing with engine reference",
                                  f"--dtype {self.dtype} does nothing with --engine reference (its hooked forwards "
                                  "run in float32); use --engine fast or leave --dtype out")

    def _apply_preset(self) -> None:
        """Give each preset field (one with an `unset` value) the preset's value, or its `unset` value
        without one; refuse a value set that differs from the preset's."""
        fixed = preset_settings(self.preset)  # a setting this version does not have stays in the manifest only
        for f in fields(self):
            if "unset" not in f.metadata:
                continue
            mine = getattr(self, f.name)
            if f.name not in fixed:
                setattr(self, f.name, f.metadata["unset"] if mine is None else mine)
                continue
            theirs = fixed[f.name]
            if mine is not None and mine != theirs:
                flag = flag_of(f.name)
                raise SettingConflict(f"{f.name}: {mine!r} conflicts with preset {self.preset} ({f.name} {theirs!r})",
                                      f"{flag} {mine} contradicts --preset {self.preset} ({flag} {theirs})")
            setattr(self, f.name, theirs)

    @property
    def unit_spec(self) -> str:
        """Every unit this run ablates, as one `--units` list: `--units` and `--heads` together (default: heads)."""
        parts = [self.units] if self.units else []
        if self.heads:
            parts.append("heads" if self.heads == "all" else self.heads)
        return ",".join(parts) or "heads"

    def ablated_units(self, n_layers: int, n_heads: int) -> list:
        """The run's units (`store/labels.Unit`) for a model of these sizes; ConfigError for one outside it."""
        given = [(self.units, "--units")] if self.units or not self.heads else []
        if self.heads:
            given.append(("heads" if self.heads == "all" else self.heads, "--heads"))
        units = [u for spec, flag in given for u in parse_units(spec or "heads", n_layers, n_heads, flag=flag)]
        return list({u.label: u for u in units}.values())

    def conditions(self, n_layers: int, n_heads: int) -> list:
        """None (the units alone) and each `--given` unit.

        Under a condition, the units a shorthand names (`heads`, `L9`, …) that share a component with it
        are left out (nothing is left to ablate on top of it); a unit named by its label is refused.
        """
        units = self.ablated_units(n_layers, n_heads)
        named = {u.label for item in self.unit_spec.split(",") if not is_shorthand(item)
                 for u in parse_units(item, n_layers, n_heads)}
        out = [None]
        for text in self.given:
            cond = parse_units(text, n_layers, n_heads, flag="--given")[0]
            inside = [u.label for u in units if u.label in named and u.overlaps(cond, n_heads)]
            if inside:
                raise ConfigError(f"--given {cond.label}: the condition overlaps the unit {inside[0]}; "
                                  "a unit cannot be ablated on top of itself (leave it out of --units)")
            if all(u.overlaps(cond, n_heads) for u in units):  # no unit left to ablate on top of it: a no-op
                raise ConfigError(f"--given {cond.label}: every unit ({self.unit_spec}) overlaps the "
                                  "condition, so nothing would be ablated on top of it; name units outside it")
            out.append(cond)
        return out

    @property
    def whole_batches(self) -> bool:
        """Whether a partial last batch is dropped (the paper preset) rather than kept."""
        return self.preset == "paper"

    @property
    def preds_per_row(self) -> int:
        return self.seq_len - 1

    @property
    def n_rows(self) -> int:
        rows = -(-self.tokens // self.preds_per_row)
        # The authors' dataset_generator ran only whole batches: a partial last batch is dropped.
        return rows // self.batch_size * self.batch_size if self.whole_batches else rows

    @property
    def n_tokens(self) -> int:
        """Stored predictions (whole rows, so at least `tokens`)."""
        return self.n_rows * self.preds_per_row

    @property
    def top_tokens(self) -> int:
        """Tokens in each head's top-p% set (`store/top_tokens.top_count`)."""
        return top_count(self.top_p, self.n_tokens)

    @property
    def n_batches(self) -> int:
        return -(-self.n_rows // self.batch_size)

    def identity(self) -> dict:
        """Settings that must match to append to an existing model folder.

        Tokens, units (and heads), conditions, ablation types, resample draws and the heads with sr_mlps neuron detail are
        not among them: those extend a store.
        """
        d = self.to_json()
        for k in ("store", "tokens", "heads", "units", "given", "sr_mlps_neurons", "ablations", "resamples", "device", "engine", "heads_per_pass",
                  "overwrite", "quiet"):
            d.pop(k)
        d.pop("model_name")  # the folder's name: the same folder has it already
        return d


    def to_json(self) -> dict:
        d = asdict(self)
        d["store"] = str(self.store)
        d["ablations"] = list(self.ablations)
        d["given"] = list(self.given)
        d["counterfactuals"] = list(self.counterfactuals)
        # Stores written before arrays could be chosen recorded a bool; all and none still do,
        # so they keep matching those stores' identity.
        arrays = list(self.activations)
        d["activations"] = True if arrays == list(ARRAYS) else False if not arrays else arrays
        d.pop("dry_run")
        for k in _EXECUTION:
            d.pop(k)
        return d


_FIELDS = {f.name: f for f in fields(IngestConfig)}


def _at_least(low: int) -> str:
    return "positive" if low == 1 else f">= {low}"
