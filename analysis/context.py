"""What every figure needs besides its query frame: the models drawn and the settings.

A `Context` is built by the report from each model's manifest (through `Store.manifest`,
never a raw file read) and handed to the plot functions, which put its facts into the
title or caption: model, token count, ablation type and p.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from selfrepair.store.heads import parse_sr_heads
from selfrepair.store.labels import head_label  # noqa: F401 - the figures import it from here
from selfrepair.store.manifest import Manifest


@dataclass(frozen=True)
class ModelInfo:
    """Manifest facts about one model.

    Args:
        name: the model folder's name (the `model` column).
        n_layers: transformer blocks.
        n_heads: attention heads per block.
        n_tokens: predictions in the store.
        top_p: the p the ingest used for repair_sources and neuron_effects.
        ablations: ablation types ingested.
        resamples: resample draws ingested.
        unit_kinds: kinds of the units stored besides heads, ablated alone in the report's draw
            (`group`, `attn`, `mlp`, `block`); empty for a store of heads alone.
        revision: the Hugging Face revision (or local checkpoint label) stored, if any.
        counterfactuals: the counterfactual re-runs the store holds (empty: none).
        sr_heads: the heads the ingest's --sr-mlps-neurons named (neuron detail by sr_mlps where ablated).
        head_layers: the layers with a head ablated alone in the report's draw (set by the report).
        output_metrics: whether the store holds the output metrics (d_loss, kl, …) in every ablation file.
    """

    name: str
    n_layers: int
    n_heads: int
    n_tokens: int
    top_p: float
    ablations: tuple[str, ...]
    resamples: int
    unit_kinds: tuple[str, ...] = ()
    revision: str | None = None  # the training checkpoint stored (`ingest --revision`), if one was
    counterfactuals: tuple[str, ...] = ()  # the counterfactual re-runs stored (`--counterfactuals`)
    sr_heads: tuple[tuple[int, int], ...] = ()
    head_layers: tuple[int, ...] = ()
    output_metrics: bool = False

    @classmethod
    def from_manifest(cls, name: str, manifest: Manifest) -> "ModelInfo":
        return cls(
            name=name,
            n_layers=manifest.model.n_layers,
            n_heads=manifest.model.n_heads,
            n_tokens=manifest.n_tokens,
            top_p=manifest.config.top_p,
            ablations=manifest.config.ablations,
            resamples=manifest.config.resamples,
            revision=manifest.model.revision,
            counterfactuals=manifest.config.counterfactuals,
            sr_heads=tuple(sorted({h for spec in manifest.config.sr_mlps_neurons_runs
                                   for h in parse_sr_heads(spec, manifest.model.n_layers, manifest.model.n_heads)})),
        )


@dataclass(frozen=True)
class Context:
    """The models drawn and the settings of one figure or table.

    Args:
        models: the models drawn, sorted; a per-model figure has exactly one.
        ablation: ablation type of the headline numbers.
        p: fraction of each model's tokens kept per head (top p% by signed clean DE).
        sample: resample draw.
        heads: the heads a per-head figure draws, (layer, head), most important first.
        paper_head: the penultimate-layer head of the authors' neuron figures (None: none).
    """

    models: tuple[ModelInfo, ...]
    ablation: str
    p: float
    sample: int = 0
    heads: tuple[tuple[int, int], ...] = field(default=())
    paper_head: tuple[int, int] | None = None

    @property
    def model(self) -> ModelInfo:
        """The one model of a per-model figure."""
        return self.models[0]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    @property
    def focus_head(self) -> tuple[int, int]:
        """The head that the single-head figures draw (the first of `heads`)."""
        return self.heads[0]

    def with_model(self, model: ModelInfo, heads: tuple[tuple[int, int], ...] = (),
                   paper_head: tuple[int, int] | None = None) -> "Context":
        return replace(self, models=(model,), heads=heads, paper_head=paper_head)

    def facts(self, ablation: str | None = None) -> str:
        """One line for a title: models, token counts, ablation type and p."""
        models = ", ".join(f"{m.name} ({m.n_tokens:,} tokens)" for m in self.models)
        kind = ablation or self.ablation
        return f"{models} · {kind} ablation · p = {self.p:g}"
