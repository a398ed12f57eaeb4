"""`selfrepair ingest`: plan, clean pass, top-p% token sets, ablation sweep, shard commits.

Work is split into shards (a batch of rows × a set of heads). A shard's files are
written first and its manifest entry committed last, atomically, so a killed run
resumes by skipping committed shards and deleting leftovers.
"""

from __future__ import annotations

import importlib.metadata
import sys
import time
from dataclasses import dataclass, field, replace

import numpy as np

from selfrepair.errors import ConfigError, DeviceError, StoreConflict, UnsupportedModel
from selfrepair.ingest import corpus as C
from selfrepair.ingest import models as M
from selfrepair.ingest.config import IngestConfig
from selfrepair.ingest.conventions import PROCESSED
from selfrepair.ingest.counterfactual_rules import check_counterfactuals, run_fraction
from selfrepair.ingest.disk import check_free_disk, count_sr_heads, estimate_run, model_shape
from selfrepair.ingest.metric_support import check_output_metrics
from selfrepair.ingest.executors import make_executor
from selfrepair.ingest.model_sizes import pre_load_facts
from selfrepair.ingest.pairing import pairs_digest, rule, source_rows
from selfrepair.ingest.presets import ROWS_RULE, preset_settings
from selfrepair.ingest.preload import ModelFacts, pre_load_model_facts, weights_facts
from selfrepair.ingest.progress import Progress, library_bars
from selfrepair.ingest.jobs import AblationJob, CleanJob, NeuronJob, batch_top_sets, heads_per_pass
from selfrepair.store import arrays, files, plan, top_tokens
from selfrepair.store.heads import parse_sr_heads
from selfrepair.store.labels import head_label
from selfrepair.store.estimate import Estimate, array_shapes, human
from selfrepair.store.manifest import Manifest
from selfrepair.store.model_store import ModelStore, model_dirname
from selfrepair.store.schema import ABLATION_KINDS, SHARD_PHASES
from selfrepair.store.writer import Writer

_VERSIONED = ("selfrepair", "torch", "transformer-lens", "transformers", "duckdb", "pyarrow", "polars", "zarr", "numpy")


def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for pkg in _VERSIONED:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


@dataclass
class IngestResult:
    """What a run did: the model folder, shard counts and timings."""

    model_store: ModelStore
    model: str
    n_tokens: int
    shards_written: int = 0
    shards_skipped: int = 0
    seconds: dict = field(default_factory=dict)  # load, clean, ablation, total; commit: the driver's commits alone
    estimate: Estimate | None = None  # the store's estimated bytes per table and array


class Ingest:
    """One ingest run. Construction is cheap; `run()` does the work."""

    def __init__(self, config: IngestConfig, log=print):
        self.cfg = config
        self.log = (lambda *a, **k: None) if config.quiet else log
        self._warn = log  # shown even with --quiet
        self._replace = False  # the stored configuration conflicts and --overwrite was given
        self._grow: dict = {}  # corpus, n_rows, n_tokens: set once this run's clean shards are all committed
        self._damaged: dict[str, str] = {}  # committed shards whose files are missing or damaged: redone
        self._facts: ModelFacts | None = None  # the model's facts from its config, before the load

    def run(self) -> IngestResult:
        """Lock the model folder, check it, load the model, then do the missing clean and ablation work."""
        cfg = self.cfg
        spec = M.resolve(cfg.model, cfg.revision, cfg.model_name)  # a revision is its own model: NAME@REV
        M.check_revision(spec)  # a revision that does not exist: refused before the load
        sizes, arch = pre_load_facts(spec, cfg.revision)  # one read of its config.json or GGUF metadata
        if sizes is not None:  # units and conditions outside the model: refused before it loads
            cfg.conditions(*sizes)
        check_output_metrics(cfg.output_metrics, spec, cfg.revision, arch)  # a head they cannot read: before the load
        if arch is not None:  # a kind the family does not define (MLP9 on Mixtral): refused before it loads
            cfg = self.cfg = _family_settings(cfg, arch, sizes, self.log)
        if arch is not None:  # frozen attention where attention skips AttentionInterface: refused before it loads
            check_counterfactuals(cfg.counterfactuals, arch)
        # Family, shape and context from the config alone, so the plan prints before the load (None: unknown).
        self._facts = facts = pre_load_model_facts(spec, cfg.revision)
        if facts is not None and arch is None:  # a GGUF file: its family is known only now
            cfg = self.cfg = _family_settings(cfg, facts.family.name, (facts.n_layers, facts.n_heads), self.log)
        if facts is not None and arch is None:  # frozen attention where attention skips AttentionInterface
            check_counterfactuals(cfg.counterfactuals, facts.family.name)
        if cfg.dry_run:
            return self._dry_run(spec, facts)
        files.check_writable_dir(cfg.store)  # before the expensive load; created only once inputs pass
        corpus_spec = cfg.corpus or C.default_corpus(spec.name, spec.path is not None and spec.gguf_file is None)
        _precheck_corpus(corpus_spec)
        ms = ModelStore(cfg.store / model_dirname(spec.name))
        identity = cfg.identity() | {"corpus": corpus_spec, "model": spec.hf_id}
        self._writer = None
        existed = ms.path.exists()  # only a folder this run creates may be removed if it fails
        try:
            if ms.path.is_dir():
                # An existing folder is locked before anything else, so the conflict check,
                # the start-up cleanup and every commit see one store that nobody else writes.
                self._writer = self._lock(ms)
                stored = self._writer.manifest.model.raw.get("family") if self._writer.manifest else None
                if arch is None and stored:  # no config before the load: the store names its family
                    cfg = self.cfg = _family_settings(cfg, stored, sizes, self.log)
                    identity = cfg.identity() | {"corpus": corpus_spec, "model": spec.hf_id}
                self._check_identity(self._writer, identity)  # before the model loads
            result = self._run(spec, ms, corpus_spec, identity)
        except BaseException:
            if self._writer is not None:
                # Only the lock holder may remove a folder it created and never committed to, and
                # only while it still holds the lock: a writer refused by the lock created nothing.
                if not existed:
                    ms.remove_if_uncommitted()
                self._writer.close(fold=False)  # the log keeps every commit; the next writer folds it
            raise
        self._writer.close()
        return result

    def _run(self, spec, ms: ModelStore, corpus_spec: str, identity: dict) -> IngestResult:
        cfg = self.cfg
        t0 = time.perf_counter()
        # With Ray the workers hold the accelerators; the driver's copy (plan, self-check) stays on the CPU.
        device = "cpu" if cfg.executor == "ray" else cfg.device
        planned = None
        if self._facts is not None:  # the plan, the disk check and the sr_mlps check before the load
            planned = self._plan(spec, self._facts, M.pick_device(device), corpus_spec, ms)
        self.log(f"loading {spec.name} ({spec.hf_id}) …")
        with library_bars(f"loading {spec.name}: de-quantising GGUF tensors", self.cfg.quiet):
            model = M.load_model(cfg.model, device, cfg.revision)
        model.spec = spec  # the store's name for it (--model-name, @revision) and the revision it records
        from selfrepair.ingest.weights import read_weights  # torch: loaded with the model, not on import

        _check_context(M.context_length(model.hf_model.config), cfg.seq_len)  # read_weights runs the model at seq_len
        w = read_weights(model.hf_model, cfg.seq_len, cfg.preset)
        check_counterfactuals(cfg.counterfactuals, w.family.name)
        self.log(f"loaded {spec.name} in {time.perf_counter() - t0:.1f} s")
        family_cfg = _family_settings(cfg, w.family.name, (w.n_layers, w.n_heads), self.log)
        if family_cfg is not cfg:
            # No config was readable before the load (e.g. a GGUF file): the identity checked then is not this run's.
            cfg = self.cfg = family_cfg
            identity = cfg.identity() | {"corpus": corpus_spec, "model": spec.hf_id}
            if self._writer is not None:
                self._check_identity(self._writer, identity)
        if model.bridge is not None and (model.cfg.n_layers, model.cfg.n_heads) != (w.n_layers, w.n_heads):
            raise UnsupportedModel(f"{w.family.name}: the bridge sees {model.cfg.n_layers} layers × "
                                   f"{model.cfg.n_heads} heads, the model {w.n_layers} × {w.n_heads}")
        if cfg.engine == "reference":
            model.require_bridge()
            if w.convention != PROCESSED:
                raise UnsupportedModel(f"{w.family.name}: --engine reference reads TransformerLens's processed "
                                       "logits; with --preset paper use the fast engine")
            if w.post_norm or w.softcap:
                raise UnsupportedModel(f"{w.family.name}: --engine reference (TransformerLens) does not model "
                                       "post-norm blocks or softcapped logits as DESIGN.md defines them; "
                                       "use the fast engine")
        units, conditions = _ablated_units(cfg, w)
        if planned is None:  # checked before the load otherwise
            self._check_sr_heads(units, w.n_layers, w.n_heads)  # ranges, and a named head that is ablated
        estimate = check_free_disk(cfg, ms, w, units, len(conditions) - 1)  # before the self-check's passes
        if planned is None or planned != weights_facts(w):  # no plan yet, or the config told another shape
            self._print_plan(spec, weights_facts(w), model.device, units, conditions, corpus_spec, estimate)
        checks = None
        if self._writer is None:
            rows_np = _rows(cfg, corpus_spec, model)
            if "resample" in cfg.ablations:
                _sources(cfg, 0)  # fails early with < 2 rows
            # A new folder: checked, then created and locked, only once the numbers are trusted.
            checks = self._self_check(model, w, rows_np, units, conditions)
            self._writer = self._lock(ms)
            self._check_identity(self._writer, identity)
        writer = self._writer
        have = 0 if writer.manifest is None else max(writer.manifest.n_rows, plan.stored_rows(writer.manifest))
        if not self._replace and have > cfg.n_rows:
            # The store already has more rows (or an interrupted extension stored some): the run
            # covers all of them (new heads or ablations too).
            cfg = self.cfg = replace(cfg, tokens=have * cfg.preds_per_row)
        rows_np = _rows(cfg, corpus_spec, model)
        if "resample" in cfg.ablations:
            _sources(cfg, 0)  # fails early with < 2 rows
        if checks is None:
            checks = self._self_check(model, w, rows_np, units, conditions)  # an existing folder: before any write
        self._open_store(writer, model, corpus_spec, rows_np, identity, w, checks)
        load_s = time.perf_counter() - t0
        with make_executor(cfg, model, w, ms, self.log) as self._executor:
            result = IngestResult(ms, spec.name, cfg.n_tokens, estimate=estimate)
            result.seconds["load"] = load_s
            t1 = time.perf_counter()
            self._clean_phase(writer, model, w, rows_np, result)
            if self._grow:  # only now: the manifest's token count never runs ahead of the stored tokens
                writer.set(**self._grow)
            result.seconds["clean"] = time.perf_counter() - t1
            top_sets = self._top_sets(writer, units)
            t2 = time.perf_counter()
            self._ablation_phase(writer, rows_np, units, conditions, top_sets, result, model.device, w)
            result.seconds["ablation"] = time.perf_counter() - t2
            t3 = time.perf_counter()
            if self._sr_neuron_phase(writer, rows_np, top_sets, result):
                result.seconds["sr_neurons"] = time.perf_counter() - t3
        result.seconds["total"] = time.perf_counter() - t0
        return result

    # -- store --------------------------------------------------------------------------
    def _lock(self, ms: ModelStore) -> Writer:
        writer = Writer.open(ms)
        if writer.lock.stale_holder:
            h = writer.lock.stale_holder
            self.log(f"took over the writer lock left by pid {h.get('pid')} on {h.get('host')} (no longer running)")
        return writer

    def _check_identity(self, writer: Writer, identity: dict) -> None:
        """Refuse (or, with --overwrite, mark for replacement) a store of another configuration."""
        if writer.manifest is None:
            return
        problem = _identity_conflict(writer.manifest, identity)
        if problem and not self.cfg.overwrite:
            raise StoreConflict(
                f"{writer.ms.path} was ingested with a different configuration ({problem}); "
                "use a new --store, or --overwrite to replace it"
            )
        self._replace = bool(problem)

    def _self_check(self, model, w, rows_np: np.ndarray, units, conditions) -> dict:
        """Compare engine, bridge and model on the first batch; refuse before writing on a mismatch."""
        import torch

        from selfrepair.ingest.selfcheck import CHECK_ROWS, check_steps, run_self_check, sample_heads, unit_cases

        cfg = self.cfg
        rows = torch.from_numpy(rows_np).to(model.device)
        first = rows[: cfg.batch_size]
        src = None
        if "resample" in cfg.ablations:
            pair = _sources(cfg, 0, 0, len(first))
            src = rows[torch.from_numpy(pair).to(rows.device)]
        if model.bridge is None:
            self.log(f"warning: {model.bridge_error}; the self-check compares the engine with the model's "
                     "own forward passes only")
        t = time.perf_counter()
        # Only what the run ablates: heads of its first, middle and last ablated layers, one unit of each other kind.
        heads = sample_heads(w.n_layers, w.n_heads, [(u.layer, u.head) for u in units if u.kind == "head"])
        cases = unit_cases(units, conditions, w.n_heads)
        bar = Progress("self-check", total=check_steps(heads, cases, cfg.ablations), unit="steps", quiet=cfg.quiet)
        try:
            checks, excused = run_self_check(model, w, first, src, cfg.ablations, cases, heads=heads,
                                             progress=bar.update, counterfactuals=cfg.counterfactuals,
                                             metrics=cfg.output_metrics != "none")
        except torch.OutOfMemoryError:
            raise DeviceError("out of GPU memory even with one head per pass (in the self-check on the first "
                              "batch); lower --batch-size") from None
        finally:
            bar.close()
        n = min(len(first), CHECK_ROWS)
        self.log(f"self-check on {n} row{'s' if n != 1 else ''} of the first batch: {len(checks)} comparisons, "
                 f"largest deviation {max(checks.values()):.2e} ({time.perf_counter() - t:.1f} s)")
        record = {"tolerance": "1e-3 of max(1, |value|)", "bridge": model.bridge_error or "TransformerBridge",
                  "deviations": checks}
        if excused:
            from selfrepair.ingest.selfcheck import BRIDGE_VS_MODEL

            engine = max(v for k, v in checks.items() if "engine vs model" in k or "full model forward" in k)
            self._warn(f"warning: TransformerLens's bridge disagrees with {w.family.name}'s own forward "
                       f"({BRIDGE_VS_MODEL} differ by {checks[BRIDGE_VS_MODEL]:.3g}) while the engine agrees with "
                       f"it (largest deviation {engine:.2g}); {len(excused)} comparison(s) with the bridge are "
                       "excused and recorded in the manifest's self_check")
            record["excused"] = excused
        return record

    def _open_store(self, writer: Writer, model, corpus_spec: str, rows_np: np.ndarray, identity: dict,
                    w, checks: dict) -> None:
        cfg = self.cfg
        fresh = {
            "model": model.facts(w),
            "self_check": checks,
            "corpus": {"spec": corpus_spec, "fingerprint": C.fingerprint(rows_np), "rows": cfg.n_rows},
            "config": cfg.to_json() | {"corpus": corpus_spec, "heads_runs": [cfg.unit_spec],
                                       "sr_mlps_neurons_runs": _sr_runs([], cfg.sr_mlps_neurons)},
            "identity": identity,
            "seq_len": cfg.seq_len,
            "n_rows": cfg.n_rows,
            "n_tokens": cfg.n_tokens,
            "ablations": list(cfg.ablations),
            "preset": _preset_facts(cfg),
            "resample": {"rule": rule(cfg.whole_batches), "samples": cfg.resamples, "seed": cfg.seed, "batch_size": cfg.batch_size},
            "top_token_rule": "floor(top_p * n_tokens) tokens per head by clean DE, ORDER BY de DESC, token_index ASC",
            "versions": _versions(),
        }
        old = writer.manifest
        if old is not None and not self._replace:
            n_old = old.n_rows
            # With fewer rows than stored nothing new is written, so only a longer or equal
            # stream can be checked against the stored fingerprint.
            if C.fingerprint(rows_np[:n_old]) != old.corpus.fingerprint:
                if not cfg.overwrite:
                    raise StoreConflict(f"{writer.ms.path} was ingested with a different configuration "
                                        "(corpus: the token stream differs from the stored one); "
                                        "use a new --store, or --overwrite to replace it")
                self._replace = True
        grow = {k: fresh[k] for k in ("corpus", "n_rows", "n_tokens")}
        if old is None or self._replace:
            # No rows are counted until their clean shards are committed (see _run).
            empty = {"corpus": fresh["corpus"] | {"fingerprint": C.fingerprint(rows_np[:0]), "rows": 0},
                     "n_rows": 0, "n_tokens": 0}
            writer.create(fresh | empty)
            self._grow = grow
            return
        removed = writer.clean_orphans()
        if removed:
            self.log(f"resume: removed {len(removed)} partial or superseded file(s) left by an earlier run")
        self._damaged = writer.ms.damaged_shards(writer.manifest)
        if self._damaged:
            sid, why = next(iter(self._damaged.items()))
            self.log(f"resume: {len(self._damaged)} committed shard(s) have missing or damaged files "
                     f"(shard {sid}: {why}); recomputing them")
        updates = {"self_check": checks}
        if cfg.n_rows > old.n_rows:  # extending with more tokens: new rows, new shards
            self._grow = grow
        kinds = [k for k in ABLATION_KINDS if k in set(old.ablations) | set(cfg.ablations)]
        samples = max(old.resample.samples, cfg.resamples)
        config = dict(old.config.raw)
        config["heads_runs"] = sorted(set(old.config.heads_runs) | {cfg.unit_spec})
        config["sr_mlps_neurons_runs"] = _sr_runs(list(old.config.sr_mlps_neurons_runs), cfg.sr_mlps_neurons)
        config.update({"ablations": kinds, "resamples": samples})
        if config != old.config.raw:
            updates["config"] = config
        if tuple(kinds) != old.ablations:
            updates["ablations"] = kinds
        if samples != old.resample.samples or not old.resample.raw:
            updates["resample"] = dict(old.resample.raw or fresh["resample"]) | {"samples": samples}
        if updates:
            writer.set(**updates)

    # -- plan ---------------------------------------------------------------------------
    def _dry_run(self, spec, facts: ModelFacts | None) -> IngestResult:
        """Print the plan and the estimate; no lock, no folder, no forward pass. The model loads only when its
        config cannot be read without it (`pre_load_model_facts` is None)."""
        cfg = self.cfg
        corpus_spec = cfg.corpus or C.default_corpus(spec.name, spec.path is not None and spec.gguf_file is None)
        device = "cpu" if cfg.executor == "ray" else M.pick_device(cfg.device)
        if facts is None:
            from selfrepair.ingest.weights import read_weights  # torch: loaded with the model, not on import

            with library_bars(f"loading {spec.name}: de-quantising GGUF tensors", cfg.quiet):
                model = M.load_model(cfg.model, cfg.device, cfg.revision)
            model.spec = spec  # the store's name for it (--model-name, @revision)
            _check_context(M.context_length(model.hf_model.config), cfg.seq_len)
            w = read_weights(model.hf_model, cfg.seq_len, cfg.preset)
            cfg = self.cfg = _family_settings(cfg, w.family.name, (w.n_layers, w.n_heads), self.log)
            facts, device = weights_facts(w), model.device
        _check_context(facts.n_ctx, cfg.seq_len)
        units, conditions = _ablated_units(cfg, facts)
        self._check_sr_heads(units, facts.n_layers, facts.n_heads)
        estimate = estimate_run(cfg, facts, units, conditions=len(conditions) - 1)
        self._print_plan(spec, facts, device, units, conditions, corpus_spec, estimate)
        return IngestResult(ModelStore(cfg.store / model_dirname(spec.name)), spec.name, cfg.n_tokens,
                            estimate=estimate)

    def _plan(self, spec, facts: ModelFacts, device: str, corpus_spec: str, ms: ModelStore) -> ModelFacts:
        """Before the load: check the units, `--sr-mlps-neurons` and the free disk against the config's
        facts and print the plan. Returns the facts printed."""
        _check_context(facts.n_ctx, self.cfg.seq_len)
        units, conditions = _ablated_units(self.cfg, facts)
        self._check_sr_heads(units, facts.n_layers, facts.n_heads)
        estimate = check_free_disk(self.cfg, ms, facts, units, len(conditions) - 1)
        self._print_plan(spec, facts, device, units, conditions, corpus_spec, estimate)
        return facts

    def _check_sr_heads(self, units, n_layers: int, n_heads: int) -> None:
        """Refuse `--sr-mlps-neurons` naming no head that is ablated (in this run or stored): its phase would
        do nothing. Name the named heads left without detail when some are ablated and some not."""
        cfg = self.cfg
        if cfg.sr_mlps_neurons == "none":
            return
        named = set(parse_sr_heads(cfg.sr_mlps_neurons, n_layers, n_heads))  # ranges, before any work
        manifest = self._writer.manifest if getattr(self, "_writer", None) is not None else None
        ablated = _head_units(units) | (_stored_head_units(manifest) if manifest is not None else set())
        problem = sr_heads_problem(cfg.sr_mlps_neurons, named, ablated, n_layers)
        if problem:
            raise ConfigError(problem)
        missing = named - ablated
        if missing:
            self.log(f"note: --sr-mlps-neurons {cfg.sr_mlps_neurons}: {len(missing)} of its {len(named)} heads are not "
                     f"ablated ({_heads_text(missing)}), so only the other {len(named & ablated)} get neuron detail "
                     "by sr_mlps")

    def _print_plan(self, spec, facts: ModelFacts, device: str, units, conditions, corpus_spec: str,
                    estimate: Estimate) -> None:
        cfg = self.cfg
        draws = sum(cfg.resamples if k == "resample" else 1 for k in cfg.ablations)
        pairs = sum(c is None or not u.overlaps(c, facts.n_heads) for u in units for c in conditions)
        abl_rows = draws * pairs * cfg.n_tokens
        kept = ",".join(cfg.activations) or "none"
        shape = facts.shape
        self.log(
            f"selfrepair ingest: {spec.name} ({spec.hf_id}, {facts.family.name}) — {shape.n_layers} layers × "
            f"{shape.n_heads} heads, d_model {shape.d_model}, {'parallel' if shape.parallel else 'sequential'}, "
            f"{facts.norm}{', post-norm blocks' if facts.post_norm else ''} — on {device} "
            f"(matrix products {cfg.dtype}), engine {cfg.engine}\n"
            f"  corpus {corpus_spec}: {cfg.n_rows} rows × {cfg.seq_len} = {cfg.n_tokens} predictions, "
            f"{cfg.n_batches} batches of {cfg.batch_size} rows\n"
            f"  ablations {','.join(cfg.ablations)} (resamples {cfg.resamples}) on {_describe_units(units)}"
            f"{_describe_conditions(conditions)}: {abl_rows:,} unit-token ablations; top_p {cfg.top_p}, "
            f"{cfg.neurons_top_k} neurons at each end"
            f"{_sr_plan(cfg, facts, units)}\n"
            f"  store {cfg.store}, activations {kept} ({cfg.activation_dtype}), "
            f"estimated {human(estimate.total)}\n"
            f"  {_metrics_plan(cfg, facts, units)}"
        )

    # -- clean --------------------------------------------------------------------------
    def _clean_phase(self, writer: Writer, model, w, rows_np: np.ndarray, result) -> None:
        cfg = self.cfg
        preds = cfg.preds_per_row
        if cfg.activations:
            shapes = {k: v for k, v in array_shapes(model_shape(w), cfg.n_tokens).items() if k in cfg.activations}
            # One clean shard writes whole chunks (a chunk is one batch of tokens).
            writer.prepare_arrays(shapes, cfg.batch_size * preds, cfg.activation_dtype, {
                "W_O": w.W_O_eff.cpu().numpy(), "W_U": w.W_U.cpu().numpy(),
                "b_U": w.b_U.cpu().numpy(),
            } | ({"W_out_final": w.W_out_final.cpu().numpy()} if w.d_mlp else {}))  # none for a mixture of experts
        if "vocab" not in writer.manifest.derived:  # so a DE toward any token is a lookup away
            from selfrepair.ingest.clean import vocab_table

            writer.write_derived("vocab", vocab_table(model.tokenizer, w.W_U.shape[1]),
                                 {"n_tokens": writer.manifest.n_tokens})
        todo = plan.clean_work(writer.manifest, cfg.n_rows, cfg.batch_size, damaged=self._damaged)
        result.shards_skipped += len(plan.batches(cfg.n_rows, cfg.batch_size)) - len(todo)
        jobs = [CleanJob(t, rows_np[t.rows[0]:t.rows[1]], (t.rows[1] - t.rows[0]) * preds) for t in todo]
        self._run_jobs(writer, jobs, result, "clean pass", "tok")
        if cfg.activations:
            info = arrays.array_info(writer.ms.arrays_path)
            if info != writer.manifest.arrays_json():
                writer.set(arrays=info)

    def _top_sets(self, writer: Writer, units) -> dict[str, np.ndarray]:
        """Each unit's top-p% token indices by label: a head's from the stored `head_top_tokens` (rebuilt
        if stale), every other unit's from its components' clean DEs (`top_tokens.unit_top_sets`)."""
        manifest = writer.manifest
        stored = manifest.derived.get("head_top_tokens")
        if top_tokens.is_current(stored, manifest.n_tokens, self.cfg.top_p) and not writer.ms.file_problem(stored):
            table = files.read_parquet(writer.ms.table_files("head_top_tokens", manifest))
        else:
            table = top_tokens.write(writer, self.cfg.top_p)
        layer = table.column("layer").to_numpy()
        head = table.column("head").to_numpy()
        tok = table.column("token_index").to_numpy()
        out: dict[str, np.ndarray] = {}
        for key in set(zip(layer.tolist(), head.tolist())):
            out[head_label(*key)] = np.sort(tok[(layer == key[0]) & (head == key[1])])
        others = [u for u in units if u.kind != "head"]
        if others:
            out.update(top_tokens.unit_top_sets(writer.ms, others, self.cfg.top_p, manifest))
        return out

    # -- ablation -----------------------------------------------------------------------
    def _ablation_phase(self, writer: Writer, rows_np: np.ndarray, units, conditions, top_sets, result, device: str,
                        w) -> None:
        cfg = self.cfg
        preds = cfg.preds_per_row
        draws = [(k, s) for k in cfg.ablations for s in (range(cfg.resamples) if k == "resample" else [0])]
        digest = lambda sample, r0, r1: pairs_digest(_sources(cfg, sample, r0, r1))  # noqa: E731
        # Only the missing (ablation, sample, condition, unit, batch) work, from what the store already holds.
        top_digest = lambda r0, r1, us: top_tokens.shard_digest(top_sets, us, r0 * preds, r1 * preds,  # noqa: E731
                                                                cfg.counterfactuals)
        # …and the stored shards whose detail follows other top-p% sets (more tokens), or whose
        # files are missing or damaged, are redone.
        todo = _condition_work(writer.manifest, cfg, draws, units, conditions, digest, top_digest, self._damaged)
        if cfg.counterfactuals:
            self.log(f"  {','.join(cfg.counterfactuals)}: " + run_fraction(
                top_sets, units, cfg.n_rows, cfg.batch_size, cfg.seq_len, w.n_heads, heads_per_pass(cfg, device, w),
                w.post_norm).line())
        result.shards_skipped += len(plan.batches(cfg.n_rows, cfg.batch_size)) * len(draws) - \
            len({(t.kind, t.sample, t.rows) for t in todo if (t.kind, t.sample) in draws})
        jobs = []
        for t in todo:
            (r0, r1), pair = t.rows, None
            if t.kind == "resample":
                pair = _sources(cfg, t.sample, r0, r1)
            jobs.append(AblationJob(
                t, rows_np[r0:r1], pair, rows_np[pair] if pair is not None else None,
                batch_top_sets(top_sets, t.units, r0 * preds, r1 * preds), writer.manifest.n_tokens,
                len(t.units) * (r1 - r0) * preds))
        self._run_jobs(writer, jobs, result, "ablation sweep", "abl")


    def _run_jobs(self, writer: Writer, jobs: list, result, label: str, unit: str) -> None:
        """Compute jobs with the executor, committing each as it finishes, under one progress bar."""
        bar = Progress(label, total=sum(j.size for j in jobs), unit=unit, quiet=self.cfg.quiet)

        def commit(done, entry: dict) -> None:
            t = time.perf_counter()
            writer.commit_written(done.shard_id, entry, done.work.supersedes)
            result.seconds["commit"] = result.seconds.get("commit", 0.0) + time.perf_counter() - t
            result.shards_written += 1

        self._executor.run(jobs, commit, bar.update)
        bar.close()

    # -- neuron detail by sr_mlps ----------------------------------------------------------
    def _sr_neuron_phase(self, writer: Writer, rows_np: np.ndarray, top_sets, result) -> bool:
        """Neuron detail for the top tokens by sr_mlps of the heads `--sr-mlps-neurons` names (in this
        run or an earlier one), where those tokens are not already detail tokens; stale detail is redone.

        Runs after the sweep: a head's sr_mlps set needs every token of its draw. Returns whether
        there was anything to check.
        """
        cfg, manifest = self.cfg, writer.manifest
        preds = cfg.preds_per_row
        n_layers, n_heads = manifest.model.n_layers, manifest.model.n_heads
        runs = manifest.config.sr_mlps_neurons_runs
        named = {h for spec in runs for h in parse_sr_heads(spec, n_layers, n_heads)}
        stored = any(e.phase == plan.NEURON_PHASE for e in manifest.shards.values())
        if not named and not stored:
            return False
        empty = np.empty(0, np.int64)
        extras: dict[tuple[str, int], dict] = {}
        for kind, sample in plan.stored_draws(manifest):
            complete = named & plan.complete_heads(manifest, cfg.n_rows, cfg.batch_size, kind, sample)
            sr = top_tokens.sr_mlps_sets(writer.ms, cfg.top_p, kind, sample, sorted(complete), manifest)
            # Tokens already in the head's top-p% set by clean DE have their detail in the ablation shard.
            extras[(kind, sample)] = {k: np.setdiff1d(v, top_sets.get(head_label(*k), empty)) for k, v in sr.items()}

        def wanted(kind, sample, r0, r1):
            return {k for k, v in extras.get((kind, sample), {}).items()
                    if np.searchsorted(v, r1 * preds) > np.searchsorted(v, r0 * preds)}

        def digest(kind, sample, r0, r1, hs):
            return top_tokens.batch_digest(extras.get((kind, sample), {}), hs, r0 * preds, r1 * preds)

        todo = plan.neuron_work(manifest, cfg.n_rows, cfg.batch_size, wanted, digest, damaged=self._damaged)
        jobs = []
        for t in todo:
            (r0, r1), pair = t.rows, None
            if t.kind == "resample":
                pair = source_rows(cfg.n_rows, cfg.batch_size, t.sample, cfg.seed, r0, r1)
            extra = {head_label(*k): v for k, v in extras.get((t.kind, t.sample), {}).items()}
            sets = batch_top_sets(extra, t.units, r0 * preds, r1 * preds)
            jobs.append(NeuronJob(t, rows_np[r0:r1], pair, rows_np[pair] if pair is not None else None, sets,
                                    sum(len(v) > 0 for v in sets.values()) * (r1 - r0) * preds))
        self._run_jobs(writer, jobs, result, "sr_mlps neuron detail", "abl")
        return True


def _family_settings(cfg: IngestConfig, name: str, sizes: tuple[int, int] | None, note) -> IngestConfig:
    """`cfg` for the family or architecture `name`: a unit kind it does not define is refused (ConfigError,
    one line); for a mixture of experts, final-MLP neuron detail (neuron_effects, neuron_totals, the
    mlp_post_final array) is switched off with a note, and asked for by `--sr-mlps-neurons` it is refused.
    Returns `cfg` itself when nothing changes."""
    from selfrepair.ingest.ablate import unit_kind_problem
    from selfrepair.ingest.families import MOE_NEURONS_WHY, family_named

    family = family_named(name)
    if family is None or not family.moe:
        return cfg
    if sizes is not None:
        for unit in cfg.ablated_units(*sizes) + [c for c in cfg.conditions(*sizes) if c is not None]:
            problem = unit_kind_problem(name, unit.kind)
            if problem:
                raise ConfigError(f"{unit.label}: {problem}")
    if cfg.sr_mlps_neurons != "none":
        by = f", set by --preset {cfg.preset}" if cfg.preset else ""
        raise ConfigError(f"sr_mlps_neurons: {family.name}: {MOE_NEURONS_WHY}, so --sr-mlps-neurons must be none "
                          f"(got {cfg.sr_mlps_neurons}{by})")
    if not cfg.neurons_top_k and "mlp_post_final" not in cfg.activations:
        return cfg
    note(f"note: {family.name}: {MOE_NEURONS_WHY}; neuron detail (neuron_effects, neuron_totals) and the "
         "mlp_post_final array are off (--neurons-top-k 0); heads, attention layers and each MLP block's DE are stored")
    return replace(cfg, neurons_top_k=0, activations=tuple(a for a in cfg.activations if a != "mlp_post_final"))


def _ablated_units(cfg: IngestConfig, w) -> tuple[list, list]:
    """The run's units and conditions (None first: the units alone), checked against the loaded model."""
    from selfrepair.ingest.ablate import check_units

    units, conditions = cfg.ablated_units(w.n_layers, w.n_heads), cfg.conditions(w.n_layers, w.n_heads)
    for condition in conditions:  # under a condition, the units sharing a component with it are left out
        check_units(w, [u for u in units if condition is None or not u.overlaps(condition, w.n_heads)], condition)
    return units, conditions


def _condition_work(manifest, cfg: IngestConfig, draws, units, conditions, digest, top_digest, damaged) -> list:
    """The ablation work of every condition (the units alone first), each planned by `plan.ablation_work`.

    Each condition's plan also redoes the invalid shards of conditions this run does not ask for; those
    are kept from the first plan only. A batch's resample pairs go with its first shard of the draw.
    """
    asked = {"" if c is None else c.label for c in conditions}
    out = []
    for i, condition in enumerate(conditions):
        label = "" if condition is None else condition.label
        for work in plan.ablation_work(manifest, cfg.n_rows, cfg.batch_size, draws, units, digest, top_digest,
                                       condition=condition, damaged=damaged):
            mine = "" if work.condition is None else work.condition.label
            if mine == label or (i == 0 and mine not in asked):
                out.append(work)
    with_sources = set()
    for work in out:
        key = (work.kind, work.sample, work.rows)
        work.with_sources = work.with_sources and key not in with_sources
        if work.with_sources:
            with_sources.add(key)
    return out


def _describe_units(units) -> str:
    """`270 heads, 30 MLP layers, 1 group` (the plan line)."""
    names = {"head": ("head", "heads"), "group": ("group", "groups"), "attn": ("attention layer", "attention layers"),
             "mlp": ("MLP layer", "MLP layers"), "block": ("block", "blocks")}
    counts = {k: sum(u.kind == k for u in units) for k in names}
    return ", ".join(f"{n} {names[k][n != 1]}" for k, n in counts.items() if n)


def _describe_conditions(conditions) -> str:
    given = [c.label for c in conditions if c is not None]
    return f", alone and given {', '.join(given)}" if given else ""


def _metrics_plan(cfg: IngestConfig, facts: ModelFacts, units) -> str:
    """The plan line on the output metrics: what they cost, as the FLOP model counts it (store/flops.py)."""
    if cfg.output_metrics == "none":
        return ("output metrics none: no d_loss, kl, d_entropy or top1_changed (those columns absent, read as NULL), "
                "no entropy in tokens")
    from selfrepair.store.flops import human_flops, output_metrics_share

    d_vocab, d_model = facts.shape.d_vocab, facts.shape.d_model
    share = output_metrics_share(facts.arch, d_vocab, cfg.seq_len, [u.layer for u in units], cfg.heads_per_pass,
                                 facts.softcapped)
    return (f"output metrics all (d_loss, kl, d_entropy, top1_changed): the full unembedding, 2·d_model·d_vocab = "
            f"{human_flops(2 * d_model * d_vocab)} per token per copy (each unit's), "
            f"+{share:.0%} of the sweep's FLOPs (--output-metrics none leaves them out)")


def _sr_plan(cfg: IngestConfig, w, units) -> str:
    """The plan line's part on neuron detail by sr_mlps: the named heads this run ablates."""
    if cfg.sr_mlps_neurons == "none":
        return ""
    n = count_sr_heads(cfg, w, units)
    whose = "heads'" if n != 1 else "head's"
    return (f", and on each of {n} ablated {whose} top {cfg.top_tokens} tokens by sr_mlps "
            f"(--sr-mlps-neurons {cfg.sr_mlps_neurons})")


def _head_units(units) -> set[tuple[int, int]]:
    return {(u.layer, u.head) for u in units if u.kind == "head"}


def _stored_head_units(manifest: Manifest) -> set[tuple[int, int]]:
    """The heads ablated alone in some stored ablation shard (an earlier run's)."""
    return {h for e in manifest.shards.values() if e.phase == SHARD_PHASES[1] for h in plan.stored_heads(manifest, e)}


def _heads_text(heads) -> str:
    """`L28H0, L28H1, … (9)`: at most four labels."""
    labels = [head_label(*h) for h in sorted(heads)]
    return ", ".join(labels) if len(labels) <= 4 else f"{', '.join(labels[:3])}, … ({len(labels)})"


def sr_heads_problem(spec: str, named: set, ablated: set, n_layers: int) -> str | None:
    """Why `--sr-mlps-neurons spec` would do nothing: none of the heads it names (`named`) is ablated, in this
    run or in the store (`ablated`); None when some are. The message says how to get what was asked."""
    if named & ablated:
        return None
    what = (f"names layer {n_layers - 2}'s heads (n_layers − 2)" if spec == "penultimate"
            else f"names {_heads_text(named)}")
    if not ablated:
        return (f"sr_mlps_neurons: --sr-mlps-neurons {spec} {what}, but no head is ablated (--units names none), so "
                "it would add no neuron detail; ablate those heads (e.g. --units heads) or leave the option out")
    layers = sorted({layer for layer, _ in ablated})
    return (f"sr_mlps_neurons: --sr-mlps-neurons {spec} {what}, but none of them is ablated (the ablated heads are "
            f"in layers {_layers_text(layers)}), so it would add no neuron detail; add them to --units/--heads "
            f"(e.g. --heads {_suggest(spec, named)}) or name ablated heads")


def _layers_text(layers: list[int]) -> str:
    return ", ".join(map(str, layers)) if len(layers) <= 6 else f"{layers[0]}..{layers[-1]} ({len(layers)} layers)"


def _suggest(spec: str, named: set) -> str:
    layers = sorted({layer for layer, _ in named})
    return ",".join(f"L{layer}" for layer in layers[:4])


def _sr_runs(runs: list, spec: str) -> list:
    """The `--sr-mlps-neurons` values a store has been ingested with (`none` is not kept)."""
    return sorted(set(runs) | ({spec} if spec != "none" else set()))


LATER_SETTINGS = ("attention_top_k", "counterfactuals", "output_metrics")  # identity settings newer than some stores


def _identity_conflict(old: Manifest, identity: dict) -> str | None:
    """The first setting that differs from the stored run's, as `key: stored …, asked …`.

    Only the settings that must match are compared: ablation types, resample draws and
    heads extend a store instead.
    """
    prev = old.identity
    for key in sorted(identity):
        if key in LATER_SETTINGS and key not in prev:
            continue  # a store from before the setting existed: its shards are redone or kept as they are
        a, b = prev.get(key), identity.get(key)
        if isinstance(a, list) or isinstance(b, (list, tuple)):
            # `activations` is a list, or True/False for all/none: a bool stays itself (a conflict, not a crash).
            a, b = (x if isinstance(x, bool) else list(x or []) for x in (a, b))
        if a != b:
            return f"{key}: stored {a!r}, asked {b!r}"
    has_resample = any(e.ablation == "resample" for e in old.shards.values())
    if has_resample and old.resample.rule != rule(identity.get("preset") == "paper"):
        return "resample pairing rule: the store's stored pairs follow an older rule"
    return None


def _sources(cfg: IngestConfig, sample: int, r0: int = 0, r1: int | None = None) -> np.ndarray:
    """The run's resample sources of rows [r0, r1) (ingest/pairing.py; the preset's rule with --preset paper)."""
    return source_rows(cfg.n_rows, cfg.batch_size, sample, cfg.seed, r0, r1, whole_batches=cfg.whole_batches)


def _rows(cfg: IngestConfig, corpus_spec: str, model) -> np.ndarray:
    """The run's token rows: TransformerLens's tokenize_and_concatenate with --preset paper, DESIGN.md's rule otherwise."""
    if cfg.preset == "paper":
        return C.tl_rows(corpus_spec, model.tokenizer, cfg.n_rows, cfg.seq_len)
    return C.build_rows(corpus_spec, model.tokenizer, cfg.n_rows, cfg.seq_len, model.bos_id, model.eos_id)


def _preset_facts(cfg: IngestConfig) -> dict | None:
    """The manifest's record of the preset: its settings, row-building and pairing rules."""
    return {"name": cfg.preset, "settings": preset_settings(cfg.preset), "rows_rule": ROWS_RULE[cfg.preset],
            "pairing_rule": rule(cfg.whole_batches), "whole_batches": cfg.whole_batches}


def _precheck_corpus(spec: str) -> None:
    """Fail on a missing local corpus before any lock or load (a hub dataset is checked when read)."""
    name = spec[3:] if spec.startswith("hf:") else spec
    hub_like = spec.startswith("hf:") or ("/" in name and not name.startswith((".", "/", "~")))
    if spec != C.EMBEDDED and not hub_like:
        next(iter(C.documents(spec)), None)


def _check_context(n_ctx: int | None, seq_len: int) -> None:
    """Refuse rows longer than the model's context (`n_ctx`, None: its config does not say)."""
    if n_ctx is not None and seq_len > n_ctx:
        raise ConfigError(f"seq_len: {seq_len} is above the model's context of {n_ctx} tokens")
