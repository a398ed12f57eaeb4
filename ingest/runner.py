"""`selfrepair ingest`: plan, clean pass, top-p% token sets, ablation sweep, shard commits.

Work is split into shards (a batch of rows × a set of heads). A shard's files are
written first and its manifest entry committed last, atomically, so a killed run
resumes by skipping committed shards and deleting leftovers.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from selfrepair.errors import ConfigError, DeviceError, StoreConflict, UnsupportedModel
from selfrepair.ingest import corpus as C
from selfrepair.ingest.config import IngestConfig, parse_heads
from selfrepair.ingest.pairing import RULE, source_rows
from selfrepair.ingest.progress import Progress
from selfrepair.store import arrays, files, top_tokens
from selfrepair.store.model_store import ModelStore, model_dirname

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
    seconds: dict = field(default_factory=dict)


class Ingest:
    """One ingest run. Construction is cheap; `run()` does the work."""

    def __init__(self, config: IngestConfig, log=print):
        self.cfg = config
        self.log = (lambda *a, **k: None) if config.quiet else log

    def run(self) -> IngestResult:
        """Run the ingest; on failure before the first commit, remove the model folder this run created."""
        self._created: ModelStore | None = None
        try:
            return self._run()
        except BaseException:
            if self._created is not None:
                self._created.remove_if_uncommitted()
            raise

    def _run(self) -> IngestResult:
        import torch

        from selfrepair.ingest.models import load_model, resolve

        cfg = self.cfg
        spec = resolve(cfg.model)
        files.check_writable_dir(cfg.store)  # before the expensive load; created only once inputs pass
        corpus_spec = cfg.corpus or C.default_corpus(spec.name, spec.path is not None and spec.gguf_file is None)
        t0 = time.perf_counter()
        model = load_model(cfg.model, cfg.device, cfg.dtype, cfg.revision)
        c = model.cfg
        if cfg.seq_len > c.n_ctx:
            raise ConfigError(f"seq_len: {cfg.seq_len} is above the model's context of {c.n_ctx} tokens")
        heads = parse_heads(cfg.heads, c.n_layers, c.n_heads)
        rows_np = C.build_rows(corpus_spec, model.tokenizer, cfg.n_rows, cfg.seq_len, model.bos_id, model.eos_id)
        if "resample" in cfg.ablations:
            source_rows(cfg.n_rows, cfg.batch_size, 0, cfg.seed)  # fails early with < 2 rows
        from selfrepair.ingest.weights import read_weights

        w = read_weights(model.hf_model, cfg.seq_len)
        if (w.n_layers, w.n_heads) != (c.n_layers, c.n_heads):
            raise UnsupportedModel(f"{w.family.name}: the bridge sees {c.n_layers} layers × {c.n_heads} heads, "
                                   f"the model {w.n_layers} × {w.n_heads}")
        if cfg.engine == "reference" and (w.post_norm or w.softcap):
            raise UnsupportedModel(f"{w.family.name}: --engine reference (TransformerLens) does not model post-norm "
                                   "blocks or softcapped logits as DESIGN.md defines them; use the fast engine")
        low = None if cfg.dtype == "float32" else getattr(torch, cfg.dtype)
        rows = torch.from_numpy(rows_np).to(model.device)
        checks = self._self_check(model, w, rows)
        ms = ModelStore(cfg.store / model_dirname(spec.name))
        manifest = self._open_manifest(ms, model, corpus_spec, rows_np, w, checks)
        load_s = time.perf_counter() - t0
        self._print_plan(model, heads, corpus_spec)
        result = IngestResult(ms, spec.name, cfg.n_tokens)
        result.seconds["load"] = load_s

        t1 = time.perf_counter()
        manifest = self._clean_phase(ms, manifest, model, w, rows, result)
        result.seconds["clean"] = time.perf_counter() - t1
        top_sets = self._top_sets(ms)
        t2 = time.perf_counter()
        self._ablation_phase(ms, manifest, model, w, low, rows, heads, top_sets, result)
        result.seconds["ablation"] = time.perf_counter() - t2
        result.seconds["total"] = time.perf_counter() - t0
        return result

    # -- store --------------------------------------------------------------------------
    def _self_check(self, model, w, rows) -> dict:
        """Compare engine, bridge and model on the first batch; refuse before writing on a mismatch."""
        import torch

        from selfrepair.ingest.selfcheck import run_self_check

        cfg = self.cfg
        first = rows[: cfg.batch_size]
        src = None
        if "resample" in cfg.ablations:
            pair = source_rows(cfg.n_rows, cfg.batch_size, 0, cfg.seed)[: len(first)]
            src = rows[torch.from_numpy(pair).to(rows.device)]
        t = time.perf_counter()
        checks = run_self_check(model, w, first, src, cfg.ablations)
        worst = max(checks.values())
        self.log(f"self-check on the first batch: {len(checks)} comparisons, largest deviation {worst:.2e} "
                 f"({time.perf_counter() - t:.1f} s)")
        return checks

    def _open_manifest(self, ms: ModelStore, model, corpus_spec: str, rows_np: np.ndarray, w, checks: dict) -> dict:
        cfg = self.cfg
        identity = cfg.identity() | {"corpus": corpus_spec, "model": model.spec.hf_id}
        files.ensure_writable_dir(cfg.store)
        if not ms.path.exists():  # only a folder this run creates may be removed if it fails
            self._created = ms
        fresh = {
            "model": model.facts(w),
            "self_check": {"tolerance": "1e-3 of max(1, |value|)", "deviations": checks},
            "corpus": {"spec": corpus_spec, "fingerprint": C.fingerprint(rows_np), "rows": cfg.n_rows},
            "config": cfg.to_json() | {"corpus": corpus_spec},
            "identity": identity,
            "seq_len": cfg.seq_len,
            "n_rows": cfg.n_rows,
            "n_tokens": cfg.n_tokens,
            "ablations": list(cfg.ablations),
            "resample": {"rule": RULE, "samples": cfg.resamples, "seed": cfg.seed, "batch_size": cfg.batch_size},
            "top_token_rule": "floor(top_p * n_tokens) tokens per head by clean DE, ORDER BY de DESC, token_index ASC",
            "versions": _versions(),
            "shards": {},
        }
        if ms.exists():
            old = ms.manifest()
            problem = self._conflict(old, identity, rows_np)
            if problem and not cfg.overwrite:
                raise StoreConflict(
                    f"{ms.path} was ingested with a different configuration ({problem}); "
                    "use a new --store, or --overwrite to replace it"
                )
            if not problem:
                removed = ms.clean_orphans(old)
                if removed:
                    self.log(f"resume: removed {len(removed)} partial file(s) left by an interrupted run")
                if cfg.n_rows > old["n_rows"]:  # extending with more tokens: new rows, new shards
                    old.update({k: fresh[k] for k in ("corpus", "n_rows", "n_tokens")})
                old["config"]["heads_runs"] = sorted(set(old["config"].get("heads_runs", [])) | {cfg.heads})
                ms.write_manifest(old)
                return old
            files.remove_tree(ms.path)
        files.ensure_writable_dir(ms.path)
        fresh["config"]["heads_runs"] = [cfg.heads]
        ms.write_manifest(fresh)
        return fresh

    @staticmethod
    def _conflict(old: dict, identity: dict, rows_np: np.ndarray) -> str | None:
        prev = old.get("identity", {})
        for key in sorted(set(prev) | set(identity)):
            a, b = prev.get(key), identity.get(key)
            if isinstance(a, list) or isinstance(b, (list, tuple)):
                a, b = list(a or []), list(b or [])
            if a != b:
                return f"{key}: stored {a!r}, asked {b!r}"
        n_old = old["n_rows"]
        # With fewer rows than stored nothing new is written, so only a longer or equal
        # stream can be checked against the stored fingerprint.
        if len(rows_np) >= n_old and C.fingerprint(rows_np[:n_old]) != old["corpus"]["fingerprint"]:
            return "corpus: the token stream differs from the stored one"
        return None

    def _commit(self, ms: ModelStore, shard_id: str, tables: dict, entry: dict, result: IngestResult) -> dict:
        entry["files"] = ms.write_shard_files(shard_id, tables)
        result.shards_written += 1
        return ms.commit_shard(shard_id, entry)

    # -- plan ---------------------------------------------------------------------------
    def _print_plan(self, model, heads, corpus_spec: str) -> None:
        cfg = self.cfg
        c = model.cfg
        draws = sum(cfg.resamples if k == "resample" else 1 for k in cfg.ablations)
        abl_rows = draws * len(heads) * cfg.n_tokens
        per_tok = (c.n_layers * c.d_model + c.d_model + c.n_layers * c.n_heads * c.d_head
                   + 2 * c.n_layers + 1 + int(model.bridge.W_in.shape[-1]))
        act_bytes = per_tok * cfg.n_tokens * (2 if cfg.activation_dtype == "float16" else 4) if cfg.activations else 0
        est = act_bytes + abl_rows * 22 + cfg.n_tokens * (60 + 6 * c.n_layers * (c.n_heads + 1))
        self.log(
            f"selfrepair ingest: {model.spec.name} ({model.spec.hf_id}) — {c.n_layers} layers × {c.n_heads} heads, "
            f"d_model {c.d_model}, {'parallel' if c.parallel_attn_mlp else 'sequential'}, "
            f"{c.normalization_type} — on {model.device} ({cfg.dtype}), engine {cfg.engine}\n"
            f"  corpus {corpus_spec}: {cfg.n_rows} rows × {cfg.seq_len} = {cfg.n_tokens} predictions, "
            f"{cfg.n_batches} batches of {cfg.batch_size} rows\n"
            f"  ablations {','.join(cfg.ablations)} (resamples {cfg.resamples}) on {len(heads)} heads: "
            f"{abl_rows:,} head-token ablations; top_p {cfg.top_p}, {cfg.neurons_top_k} neurons\n"
            f"  store {cfg.store}, estimated {est / 1e6:,.1f} MB"
        )

    # -- clean --------------------------------------------------------------------------
    def _clean_phase(self, ms, manifest, model, w, rows, result) -> dict:
        from selfrepair.ingest.clean import TokenStrings, run_clean

        cfg = self.cfg
        c = model.cfg
        preds = cfg.preds_per_row
        if cfg.activations:
            shapes = {
                "resid_pre": (cfg.n_tokens, c.n_layers, c.d_model),
                "resid_final": (cfg.n_tokens, c.d_model),
                "z": (cfg.n_tokens, c.n_layers, c.n_heads, w.d_head),
                "norm_scales": (cfg.n_tokens, len(w.norm_names)),
                "mlp_post_final": (cfg.n_tokens, w.d_mlp),
            }
            arrays.create_arrays(ms.arrays_path, shapes, cfg.batch_size * preds, cfg.activation_dtype)
            if not (ms.arrays_path / "weights").exists():
                arrays.write_weights(ms.arrays_path, {
                    "W_O": w.W_O_eff.cpu().numpy(), "W_U": w.W_U.cpu().numpy(),
                    "b_U": w.b_U.cpu().numpy(), "W_out_final": w.W_out_final.cpu().numpy(),
                })
        strings = TokenStrings(model.tokenizer)
        todo = [(r0, min(r0 + cfg.batch_size, cfg.n_rows)) for r0 in range(0, cfg.n_rows, cfg.batch_size)]
        bar = Progress("clean pass", total=cfg.n_tokens, unit="tok", quiet=cfg.quiet)
        for r0, r1 in todo:
            shard = f"clean-{r0:08d}-{r1:08d}"
            if shard in manifest["shards"]:
                result.shards_skipped += 1
                bar.update((r1 - r0) * preds)
                continue
            out = run_clean(w, rows[r0:r1], r0, strings, cfg.activations)
            chunks = {}
            for name, values in out.arrays.items():
                arrays.write_region(ms.arrays_path, name, r0 * preds, values)
                # Each clean shard writes whole chunks; their checksums let `verify` spot damage.
                for p in arrays.region_chunks(ms.arrays_path, name, r0 * preds, r1 * preds):
                    chunks[str(p.relative_to(ms.path))] = files.sha256_file(p) if p.exists() else None
            entry = {"phase": "clean", "rows": [r0, r1], "tokens": [r0 * preds, r1 * preds], "chunks": chunks}
            manifest = self._commit(ms, shard, out.tables, entry, result)
            bar.update((r1 - r0) * preds)
        bar.close()
        manifest["arrays"] = arrays.array_info(ms.arrays_path)
        ms.write_manifest(manifest)
        return manifest

    def _top_sets(self, ms: ModelStore) -> dict[tuple[int, int], np.ndarray]:
        """Each head's top-p% token indices, from the stored `head_top_tokens` (rebuilt if stale)."""
        manifest = ms.manifest()
        stored = manifest.get("derived", {}).get("head_top_tokens")
        if stored and stored["n_tokens"] == manifest["n_tokens"] and stored["top_p"] == self.cfg.top_p:
            table = ms.read_table("head_top_tokens")
        else:
            table = top_tokens.write(ms, self.cfg.top_p)
        layer = table.column("layer").to_numpy()
        head = table.column("head").to_numpy()
        tok = table.column("token_index").to_numpy()
        out: dict[tuple[int, int], np.ndarray] = {}
        for key in set(zip(layer.tolist(), head.tolist())):
            out[key] = np.sort(tok[(layer == key[0]) & (head == key[1])])
        return out

    # -- ablation -----------------------------------------------------------------------
    def _heads_per_pass(self, model, n_heads_layer: int) -> int:
        cfg = self.cfg
        if cfg.heads_per_pass:
            return cfg.heads_per_pass
        import torch

        c = model.cfg
        # Live floats per head copy in one patched pass: a few residual-sized tensors, the
        # MLP hidden layer, the attention pattern, and the per-component ΔDE kept per token.
        per_tok = 6 * c.d_model + 3 * int(model.bridge.W_in.shape[-1]) + c.n_heads * cfg.seq_len \
            + c.n_layers * (c.n_heads + 1)
        per_head = cfg.batch_size * cfg.seq_len * per_tok * 4
        if model.device == "cuda":
            free = torch.cuda.mem_get_info()[0] * 0.5
        else:
            import os

            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.25
        return max(1, min(n_heads_layer, int(free // max(per_head, 1))))

    def _ablation_phase(self, ms, manifest, model, w, low, rows, heads, top_sets, result) -> None:
        import torch

        from selfrepair.ingest.ablate import FastBatch, ReferenceBatch, ablation_tables

        cfg = self.cfg
        preds = cfg.preds_per_row
        heads_key = hashlib.sha256(json.dumps(heads).encode()).hexdigest()[:8]
        draws = [(k, s) for k in cfg.ablations for s in (range(cfg.resamples) if k == "resample" else [0])]
        total = len(draws) * len(heads) * cfg.n_tokens
        bar = Progress("ablation sweep", total=total, unit="abl", quiet=cfg.quiet)
        hpp = self._heads_per_pass(model, model.cfg.n_heads)
        make = (lambda r: FastBatch(w, r, low)) if cfg.engine == "fast" else (lambda r: ReferenceBatch(model.bridge, r))
        for r0 in range(0, cfg.n_rows, cfg.batch_size):
            r1 = min(r0 + cfg.batch_size, cfg.n_rows)
            pending = [(k, s) for k, s in draws if f"abl-{k}-s{s}-{r0:08d}-{r1:08d}-h{heads_key}" not in manifest["shards"]]
            skipped = len(draws) - len(pending)
            result.shards_skipped += skipped
            bar.update(skipped * len(heads) * (r1 - r0) * preds)
            if not pending:
                continue
            with torch.no_grad():
                ctx = make(rows[r0:r1])
                for kind, sample in pending:
                    src, pair = None, None
                    if kind == "resample":
                        pair = source_rows(cfg.n_rows, cfg.batch_size, sample, cfg.seed)[r0:r1]
                        src = make(rows[torch.from_numpy(pair).to(rows.device)])
                    while True:
                        try:
                            tables = ablation_tables(ctx, src, kind, sample, heads, rows[r0:r1], r0, top_sets,
                                                     cfg.neurons_top_k, hpp, w, bar.update)
                            break
                        except torch.OutOfMemoryError:
                            if hpp == 1:
                                raise DeviceError("out of GPU memory even with one head per pass; "
                                                  "lower --batch-size") from None
                            hpp = max(1, hpp // 2)
                            torch.cuda.empty_cache() if torch.cuda.is_available() else None
                            self.log(f"out of memory: retrying with {hpp} heads per pass")
                    if pair is not None:
                        tables["resample_sources"] = pa.table({
                            "sample": np.full(r1 - r0, sample, dtype=np.int16),
                            "row": np.arange(r0, r1, dtype=np.int32), "source_row": pair.astype(np.int32)})
                    shard = f"abl-{kind}-s{sample}-{r0:08d}-{r1:08d}-h{heads_key}"
                    entry = {"phase": "ablation", "rows": [r0, r1], "ablation": kind, "sample": sample,
                             "heads": cfg.heads, "heads_key": heads_key, "engine": cfg.engine}
                    manifest = self._commit(ms, shard, tables, entry, result)
        bar.close()
