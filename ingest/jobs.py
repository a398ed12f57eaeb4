"""The jobs of an ingest and the code that computes one and writes its shard files.

A job is one shard of `store/plan.py` (a clean batch, or a batch × ablation draw × head
group) with everything needed to compute it and nothing else: its token rows, the
resample source rows, and its batch's part of each head's top-p% token set. The same
`JobRunner` computes jobs in the ingest's own process and in each Ray worker, so both
executors write the same rows; only the committer differs.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa

from selfrepair.errors import DeviceError
from selfrepair.ingest.config import IngestConfig
from selfrepair.ingest.pairing import pairs_digest
from selfrepair.store import shards, top_tokens
from selfrepair.store.model_store import ModelStore
from selfrepair.store.plan import NEURON_PHASE, AblationWork, CleanWork


class _Shard:
    """What every job shares: its planned shard (`work`) names it."""

    @property
    def shard_id(self) -> str:
        return self.work.shard_id

    def _what(self) -> str:
        w = self.work
        return f"{w.kind} draw {w.sample}" if w.kind == "resample" else w.kind


@dataclass
class CleanJob(_Shard):
    """One clean batch. `rows`: token ids [batch, seq_len]; `size`: its predictions (progress)."""

    work: CleanWork
    rows: np.ndarray
    size: int

    def describe(self) -> str:
        return f"{self.shard_id} (clean pass, rows {self.work.rows[0]}-{self.work.rows[1]})"


@dataclass
class _BatchDraw(_Shard):
    """A batch under one ablation draw: what ablation and neuron jobs both patch.

    Args:
        work: the planned shard.
        rows: token ids [batch, seq_len].
        pair: resample source row of each row (resample only).
        source_rows: token ids of those source rows [batch, seq_len] (resample only).
    """

    work: AblationWork
    rows: np.ndarray
    pair: np.ndarray | None
    source_rows: np.ndarray | None


@dataclass
class AblationJob(_BatchDraw):
    """One ablation shard: a batch, an ablation draw, a condition and a group of units.

    Args (besides `_BatchDraw`'s):
        top_sets: unit label -> that unit's top-p% token indices inside this batch (sorted).
        top_n_tokens: the token count the top sets were taken over (recorded in the entry).
        size: unit-token ablations in this job (progress).
    """

    top_sets: dict[str, np.ndarray] = field(default_factory=dict)
    top_n_tokens: int = 0
    size: int = 0

    def describe(self) -> str:
        w = self.work
        return f"{self.shard_id} ({self._what()}, rows {w.rows[0]}-{w.rows[1]}, units {w.heads_spec})"


@dataclass
class NeuronJob(_BatchDraw):
    """Extra neuron detail of one batch and ablation draw (`--sr-mlps-neurons`): re-patch only its heads.

    Args (besides `_BatchDraw`'s):
        detail_sets: head label -> that head's extra detail tokens inside this batch (sorted; may be empty).
        size: head-token ablations in this job (progress).
    """

    detail_sets: dict[str, np.ndarray] = field(default_factory=dict)
    size: int = 0

    def describe(self) -> str:
        w = self.work
        return (f"{self.shard_id} (sr_mlps neuron detail, {self._what()}, rows {w.rows[0]}-{w.rows[1]}, "
                f"units {w.heads_spec})")


def batch_top_sets(top_sets: dict[str, np.ndarray], units, t0: int, t1: int) -> dict:
    """Each unit's top tokens that fall in the token range [t0, t1) (the sets are sorted), by label."""
    out = {}
    for key in (u.label for u in units):
        top = top_sets.get(key)
        if top is not None:
            out[key] = top[np.searchsorted(top, t0):np.searchsorted(top, t1)]
    return out


class JobRunner:
    """Computes jobs on one loaded model and writes their shard files; returns the entries to commit.

    Args:
        cfg: the run's configuration.
        model: the loaded model (ingest/models.py).
        w: its processed weights.
        ms: the model folder the files go into.
        log: where a retry with fewer heads per pass is reported.
    """

    def __init__(self, cfg: IngestConfig, model, w, ms: ModelStore, log=print):
        import torch

        from selfrepair.ingest.clean import TokenStrings

        self.cfg, self.model, self.w, self.ms, self.log = cfg, model, w, ms, log
        self.dtype = None if cfg.dtype == "float32" else getattr(torch, cfg.dtype)  # None: a float32 sweep
        self.strings = TokenStrings(model.tokenizer)
        self.hpp: int | None = None  # heads per pass, found on the first ablation job
        self._ctx_rows, self._ctx = None, None  # the last batch's clean state, reused across its draws

    def run(self, job, on_pass: Callable[[int], None] = lambda n: None) -> dict:
        """Compute `job`, write its files; returns its shard entry.

        Args:
            job: a CleanJob or AblationJob.
            on_pass: called with the tokens (clean) or head-token ablations done, as they are done.
        """
        if isinstance(job, CleanJob):
            entry = self.clean(job)
            on_pass(job.size)
            return entry
        if isinstance(job, NeuronJob):
            return self.neurons(job, on_pass)
        return self.ablation(job, on_pass)

    def _tensor(self, rows: np.ndarray):
        import torch

        # A copy: a Ray worker receives read-only arrays, which torch will not wrap.
        return torch.tensor(rows, device=self.model.device)

    def clean(self, job: CleanJob) -> dict:
        from selfrepair.ingest.clean import run_clean

        cfg, (r0, r1) = self.cfg, job.work.rows
        preds = cfg.preds_per_row
        out = run_clean(self.w, self._tensor(job.rows), r0, self.strings, bool(cfg.activations),
                        metrics=cfg.output_metrics != "none")
        values = {k: v for k, v in out.arrays.items() if k in cfg.activations}
        return shards.write_clean_shard(self.ms, job.shard_id, (r0, r1), (r0 * preds, r1 * preds),
                                        out.tables, values)

    def heads_per_pass(self) -> int:
        if self.hpp is None:
            self.hpp = heads_per_pass(self.cfg, self.model.device, self.w)
        return self.hpp

    def _patching(self, job, compute) -> dict:
        """Run `compute(ctx, src, rows, hpp)` on the job's batch, halving the heads per pass on out-of-memory."""
        import torch

        from selfrepair.ingest.ablate import FastBatch, ReferenceBatch

        cfg, w, work = self.cfg, self.w, job.work
        metrics = cfg.output_metrics != "none"  # a resample source batch needs none (nor its unembedding)
        make = (lambda r, source=False: FastBatch(w, r, self.dtype, source=source, metrics=metrics and not source,
                                                  logits=False)  # the sweep reads no whole logits
                ) if cfg.engine == "fast" else (
            lambda r, source=False: ReferenceBatch(self.model.require_bridge(), r, metrics=metrics and not source))
        rows = self._tensor(job.rows)
        hpp = self.heads_per_pass()
        with torch.no_grad():
            if self._ctx_rows != work.rows:
                self._ctx_rows, self._ctx = work.rows, make(rows)
            src = make(self._tensor(job.source_rows), source=True) if work.kind == "resample" else None
            while True:
                try:
                    return compute(self._ctx, src, rows, hpp)
                except torch.OutOfMemoryError:
                    if hpp == 1:
                        raise DeviceError("out of GPU memory even with one head per pass; "
                                          "lower --batch-size, or use --dtype bfloat16 (the matrix products "
                                          "only: errors stay within 2% of the effects)") from None
                    hpp = self.hpp = max(1, hpp // 2)
                    torch.cuda.empty_cache() if torch.cuda.is_available() else None
                    self.log(f"out of memory: retrying with {hpp} heads per pass")

    def ablation(self, job: AblationJob, on_pass=lambda n: None) -> dict:
        from selfrepair.ingest.ablate import ablation_tables

        cfg, w, work = self.cfg, self.w, job.work
        kind, sample, (r0, r1) = work.kind, work.sample, work.rows
        tables = self._patching(job, lambda ctx, src, rows, hpp: ablation_tables(
            ctx, src, kind, sample, work.units, rows, r0, job.top_sets, cfg.neurons_top_k, hpp, w, on_pass,
            cfg.attention_top_k, condition=work.condition, counterfactuals=cfg.counterfactuals))
        if not work.with_condition_tokens:  # one shard per batch, draw and condition holds its baseline
            tables.pop("condition_tokens", None)
        entry = {"phase": "ablation", "rows": [r0, r1], "ablation": kind, "sample": sample,
                 **work.entry_fields(), "engine": cfg.engine, "top_n_tokens": job.top_n_tokens,
                 # the top tokens its detail covers: a shard whose set changes later is redone
                 "top_sha": top_tokens.shard_digest(job.top_sets, work.units, r0 * cfg.preds_per_row,
                                                   r1 * cfg.preds_per_row, cfg.counterfactuals)}
        if job.pair is not None:
            entry["pairs_sha"] = pairs_digest(job.pair)
            if work.with_sources:  # one shard per batch and draw holds its pairs, so keys never repeat
                tables["resample_sources"] = pa.table({
                    "sample": np.full(r1 - r0, sample, dtype=np.int16),
                    "row": np.arange(r0, r1, dtype=np.int32), "source_row": job.pair.astype(np.int32)})
        return shards.write_shard(self.ms, job.shard_id, entry, tables)

    def neurons(self, job: NeuronJob, on_pass=lambda n: None) -> dict:
        from selfrepair.ingest.ablate import neuron_detail_tables

        cfg, w, work = self.cfg, self.w, job.work
        kind, sample, (r0, r1) = work.kind, work.sample, work.rows
        detail = {u: job.detail_sets.get(u.label, np.empty(0, np.int64)) for u in work.units}
        tables = self._patching(job, lambda ctx, src, rows, hpp: neuron_detail_tables(
            ctx, src, kind, sample, detail, rows, r0, cfg.neurons_top_k, hpp, w, on_pass))
        entry = {"phase": NEURON_PHASE, "rows": [r0, r1], "ablation": kind, "sample": sample,
                 **work.entry_fields(), "engine": cfg.engine,
                 # the extra tokens it holds detail for: a shard whose sets change later is redone
                 "detail_sha": top_tokens.batch_digest(job.detail_sets, work.units, r0 * cfg.preds_per_row,
                                                      r1 * cfg.preds_per_row)}
        if job.pair is not None:
            entry["pairs_sha"] = pairs_digest(job.pair)
        return shards.write_shard(self.ms, job.shard_id, entry, tables)


def heads_per_pass(cfg: IngestConfig, device: str, w) -> int:
    """Units batched into one patched pass: `--heads-per-pass`, or the most units sharing a first layer,
    as many of them as half the free memory holds."""
    if cfg.heads_per_pass:
        return cfg.heads_per_pass
    import torch

    from selfrepair.ingest.output_metrics import VOCAB_CHUNK

    # Live floats per head copy in one patched pass: a few residual-sized tensors, the
    # MLP hidden layer, the attention pattern, and the per-component ΔDE kept per token.
    per_tok = 6 * w.d_model + 3 * w.d_mlp + w.n_heads * cfg.seq_len + w.n_layers * (w.n_heads + 1)
    if cfg.output_metrics != "none":  # a few [copy, token, vocabulary chunk] temporaries (ingest/output_metrics.py)
        per_tok += 4 * min(VOCAB_CHUNK, w.W_U.shape[1])
    per_head = cfg.batch_size * cfg.seq_len * per_tok * 4
    if device == "cuda":
        free = torch.cuda.mem_get_info()[0] * 0.5
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.25
    # A pass holds the units of one first layer: every one of them, memory permitting.
    widest = max(Counter(u.layer for u in cfg.ablated_units(w.n_layers, w.n_heads)).values(), default=1)
    return max(1, min(max(widest, 1), int(free // max(per_head, 1))))
