"""Disk planning for one ingest: the store's estimated size and the free-disk check.

The numbers come from `store/estimate.py`; this module only turns a config and a loaded
model's weights into its shapes and counts.
"""

from __future__ import annotations

from selfrepair.errors import StoreError
from selfrepair.ingest.config import IngestConfig
from selfrepair.ingest.preload import ModelFacts
from selfrepair.store import estimate as E
from selfrepair.store import files
from selfrepair.store.heads import parse_sr_heads
from selfrepair.store.model_store import ModelStore


def model_shape(w) -> E.ModelShape:
    """The dimensions of a loaded model (`ingest/weights.py::Weights`), or of its config before the load
    (`ingest/preload.py::ModelFacts`)."""
    if isinstance(w, ModelFacts):
        return w.shape
    return E.ModelShape(n_layers=w.n_layers, n_heads=w.n_heads, d_model=w.d_model, d_head=w.d_head,
                        d_mlp=w.d_mlp, d_vocab=int(w.W_U.shape[1]), n_norms=len(w.norm_names),
                        parallel=bool(w.parallel))


def run_counts(cfg: IngestConfig, units, arrays: tuple[str, ...] | None = None, sr_heads: int = 0,
               conditions: int = 0) -> E.RunCounts:
    """The counts of the store `cfg` asks for (`arrays` overrides `cfg.activations`; `sr_heads`: `count_sr_heads`).

    `units`: `Unit`s or (layer, head) pairs; a unit's rows are a head's at its first layer. `conditions`:
    the `--given` units (each stores every unit's rows again, and its baseline)."""
    heads = [(u.layer, max(u.head, 0)) if hasattr(u, "kind") else u for u in units]
    resample = cfg.resamples if "resample" in cfg.ablations else 0
    draws = sum(cfg.resamples if k == "resample" else 1 for k in cfg.ablations)
    return E.RunCounts(sr_heads=sr_heads, n_rows=cfg.n_rows, preds_per_row=cfg.preds_per_row, batch_size=cfg.batch_size,
                       draws=draws, resample_draws=resample, heads=tuple(heads) * (conditions + 1), top_p=cfg.top_p,
                       neurons_top_k=cfg.neurons_top_k, attention_top_k=cfg.attention_top_k,
                       arrays=cfg.activations if arrays is None else arrays,
                       activation_dtype=cfg.activation_dtype, conditions=conditions,
                       counterfactuals=len(cfg.counterfactuals),
                       output_metrics=cfg.output_metrics != "none")


def count_sr_heads(cfg: IngestConfig, w, units) -> int:
    """The ablated heads `--sr-mlps-neurons` names (they get neuron detail on their top tokens by sr_mlps)."""
    heads = {(u.layer, u.head) if hasattr(u, "kind") else tuple(u) for u in units
             if not hasattr(u, "kind") or u.kind == "head"}
    return len(set(parse_sr_heads(cfg.sr_mlps_neurons, w.n_layers, w.n_heads)) & heads)


def estimate_run(cfg: IngestConfig, w, units, arrays: tuple[str, ...] | None = None, conditions: int = 0
                 ) -> E.Estimate:
    """The estimated bytes of every part of the store this run produces."""
    return E.estimate(model_shape(w), run_counts(cfg, units, arrays, count_sr_heads(cfg, w, units), conditions))


def check_free_disk(cfg: IngestConfig, ms: ModelStore, w, units, conditions: int = 0) -> E.Estimate:
    """Refuse a run whose store would not fit on the disk, before the first forward pass.

    What the model folder already holds is subtracted: a resumed or extended run writes
    only the rest (roughly: superseded shards are rewritten).

    Raises:
        StoreError: one line with the bytes needed, the bytes free and a flag that stores less.
    """
    est = estimate_run(cfg, w, units, conditions=conditions)
    need = max(0, est.total - files.tree_bytes(ms.path))
    free = files.free_disk(cfg.store)
    if need <= free:
        return est
    hints = []
    for spec in ("z", "none"):
        arrays = () if spec == "none" else (spec,)
        if set(arrays) < set(cfg.activations):
            hints.append(f"--activations {spec} (about {E.human(estimate_run(cfg, w, units, arrays, conditions).total)})")
    hint = " or ".join(hints) if hints else "fewer --tokens or --heads"
    raise StoreError(f"the store needs about {E.human(need)} in {cfg.store} but only {E.human(free)} is free; "
                     f"store less with {hint}, or use another --store")
