"""IngestConfig: every setting of one `selfrepair ingest` run, checked on construction.

Building a config never touches the network, the disk or a global seed; sizes that
follow from the settings are properties.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from selfrepair.errors import ConfigError
from selfrepair.store.heads import SR_WORDS, check_sr_heads_spec, parse_heads  # noqa: F401 - parse_heads re-exported
from selfrepair.store.estimate import select_arrays
from selfrepair.store.schema import ABLATION_KINDS, ARRAY_DTYPES, ARRAYS

ENGINES = ("fast", "reference")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
EXECUTORS = ("inprocess", "ray")
# How the work is spread changes nothing that is stored: these settings stay out of the
# manifest's config and identity, so either executor resumes or extends the other's store.
_EXECUTION = ("executor", "ray_address", "workers")


@dataclass
class IngestConfig:
    """One ingest run.

    Args:
        model: registry short name, Hugging Face id or local folder.
        revision: the Hugging Face revision (branch, tag or commit) of the weights.
        store: store root; the model gets a folder inside it.
        tokens: predictions to store (rows = ceil(tokens / (seq_len - 1))).
        seq_len: tokens per row, BOS included.
        batch_size: rows per batch: the unit of resample pairing, mean ablation and a shard.
        corpus: corpus spec (None: the default for the model).
        ablations: ablation kinds to run.
        resamples: resample draws (draw 0 is the paper's next-batch rule).
        heads: `all` or labels such as `L9H11,L10`.
        top_p: fraction of each head's tokens (by clean DE) that get repair/neuron detail.
        neurons_top_k: final-MLP neurons kept per ablated head and top token.
        attention_top_k: attention sources kept per ablated head and top token (`attention_top`).
        sr_mlps_neurons: heads whose top floor(top_p · N) tokens by sr_mlps (`d_de_mlps`) also get
            neuron detail: `none`, `all`, `penultimate` (every head of layer n_layers − 2, the
            paper's choice) or labels such as `L10H3,L11`. Like `heads`, naming more later extends.
        device: auto, cpu or cuda.
        dtype: compute dtype of the model.
        engine: `fast` (the FLOP-minimal sweep) or `reference` (one hooked forward per head).
        heads_per_pass: heads batched into one patched pass (None: from free memory).
        activations: Zarr activation arrays to keep: a tuple of names from `store/schema.py::ARRAYS`,
            or a spec such as `all`, `none`, `z`, `resid,z` (True: all, False: none).
        activation_dtype: float16 or float32 for the Zarr arrays.
        seed: seed of the extra resample pairings.
        overwrite: replace an existing model folder with a different configuration.
        quiet: no plan, progress bars or summary.
        dry_run: load the model, print the plan and the disk estimate, write nothing.
        executor: `inprocess` (this process computes every unit) or `ray` (a pool of Ray actors
            computes them; this process commits).
        ray_address: the Ray cluster to join (`auto`, `HOST:PORT`); None starts a Ray of this machine.
        workers: Ray actors (default: one per GPU of the cluster, or one on its CPUs when it has none).
        preset: None, or `paper` (ingest/presets.py): the authors' rows, batches, pairing and weight
            processing. The preset's settings replace the fields left at their defaults; a field set to
            another value conflicts with it (ConfigError).
    """

    model: str = "smollm2-135m"
    revision: str | None = None
    store: Path = Path("stores")
    tokens: int = 1016
    seq_len: int = 128
    batch_size: int = 4
    corpus: str | None = None
    ablations: tuple[str, ...] = ("resample",)
    resamples: int = 1
    heads: str = "all"
    top_p: float = 0.02
    neurons_top_k: int = 50
    attention_top_k: int = 8
    sr_mlps_neurons: str = "none"
    device: str = "auto"
    dtype: str = "float32"
    engine: str = "fast"
    heads_per_pass: int | None = None
    activations: bool | str | tuple[str, ...] = True
    activation_dtype: str = "float16"
    seed: int = 0
    overwrite: bool = False
    quiet: bool = False
    dry_run: bool = False
    executor: str = "inprocess"
    ray_address: str | None = None
    workers: int | None = None
    preset: str | None = None

    def __post_init__(self) -> None:
        self._apply_preset()
        self.store = Path(self.store)
        try:
            self.activations = select_arrays(self.activations)
        except ValueError as e:
            raise ConfigError(f"activations: {e}") from None
        if isinstance(self.ablations, str):
            self.ablations = tuple(a.strip() for a in self.ablations.split(",") if a.strip())
        self.ablations = tuple(dict.fromkeys(self.ablations))
        self.sr_mlps_neurons = str(self.sr_mlps_neurons).strip() or "none"
        if self.sr_mlps_neurons.lower() in SR_WORDS:
            self.sr_mlps_neurons = self.sr_mlps_neurons.lower()
        if not self.model or not str(self.model).strip():
            raise ConfigError("model: empty name")
        if self.tokens <= 0:
            raise ConfigError(f"tokens: must be positive, got {self.tokens}")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len: must be at least 2, got {self.seq_len}")
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size: must be positive, got {self.batch_size}")
        if not self.ablations:
            raise ConfigError("ablations: none given")
        for kind in self.ablations:
            if kind not in ABLATION_KINDS:
                raise ConfigError(f"ablations: unknown ablation type {kind!r}; choose from {', '.join(ABLATION_KINDS)}")
        if self.resamples < 1:
            raise ConfigError(f"resamples: must be at least 1, got {self.resamples}")
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
        if self.attention_top_k < 0:
            raise ConfigError(f"attention_top_k: must be >= 0, got {self.attention_top_k}")
        if self.neurons_top_k < 0:
            raise ConfigError(f"neurons_top_k: must be >= 0, got {self.neurons_top_k}")
        try:
            check_sr_heads_spec(self.sr_mlps_neurons)
        except ConfigError as e:
            raise ConfigError(f"sr_mlps_neurons: {e}") from None
        if self.sr_mlps_neurons != "none" and self.neurons_top_k == 0:
            raise ConfigError("sr_mlps_neurons: needs neuron detail; --neurons-top-k is 0")
        if self.sr_mlps_neurons != "none" and self.executor == "ray":
            raise ConfigError("sr_mlps_neurons: not supported with --executor ray yet; run it with the in-process "
                              "executor (it extends a store the Ray run wrote)")
        if self.device not in DEVICES:
            raise ConfigError(f"device: {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine: {self.engine!r} is not one of {', '.join(ENGINES)}")
        if self.heads_per_pass is not None and self.heads_per_pass <= 0:
            raise ConfigError(f"heads_per_pass: must be positive, got {self.heads_per_pass}")
        if self.executor not in EXECUTORS:
            raise ConfigError(f"executor: {self.executor!r} is not one of {', '.join(EXECUTORS)}")
        if self.workers is not None and self.workers <= 0:
            raise ConfigError(f"workers: must be positive, got {self.workers}")
        if self.executor != "ray" and (self.workers is not None or self.ray_address is not None):
            raise ConfigError("workers, ray_address: only with executor ray")
        if self.activation_dtype not in ARRAY_DTYPES:
            raise ConfigError(f"activation_dtype: {self.activation_dtype!r} is not float16 or float32")

    def _apply_preset(self) -> None:
        from dataclasses import fields

        from selfrepair.ingest.presets import PRESETS

        if self.preset is None:
            return
        if self.preset not in PRESETS:
            raise ConfigError(f"preset: unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        defaults = {f.name: f.default for f in fields(self)}
        for key, value in PRESETS[self.preset].items():
            if key not in defaults:
                continue  # a setting this version does not have yet: recorded in the manifest only
            mine = getattr(self, key)
            if mine != defaults[key] and mine != value:
                raise ConfigError(f"{key}: {mine!r} conflicts with preset {self.preset} ({key} {value!r})")
            setattr(self, key, value)

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
        """Tokens in each head's top-p% set: floor(top_p · n_tokens)."""
        return math.floor(self.top_p * self.n_tokens)

    @property
    def n_batches(self) -> int:
        return -(-self.n_rows // self.batch_size)

    def identity(self) -> dict:
        """Settings that must match to append to an existing model folder.

        Tokens, heads, ablation types, resample draws and the heads with sr_mlps neuron detail are
        not among them: those extend a store.
        """
        d = self.to_json()
        for k in ("store", "tokens", "heads", "sr_mlps_neurons", "ablations", "resamples", "device", "engine", "heads_per_pass",
                  "overwrite", "quiet"):
            d.pop(k)
        return d

    def to_json(self) -> dict:
        d = asdict(self)
        d["store"] = str(self.store)
        d["ablations"] = list(self.ablations)
        # Stores written before arrays could be chosen recorded a bool; all and none still do,
        # so they keep matching those stores' identity.
        arrays = list(self.activations)
        d["activations"] = True if arrays == list(ARRAYS) else False if not arrays else arrays
        d.pop("dry_run")
        for k in _EXECUTION:
            d.pop(k)
        return d
