"""Query speed and on-disk size over a synthetic store of 20 million ablation facts.

The store is written through `store.Writer` exactly as the runner writes it: one clean
shard (`tokens`, `head_effects`, `mlp_effects`) and one resample-ablation shard
(`ablation_effects`, `resample_sources`) per batch of rows, every table in the runner's
row order (layer, head, token). Values are random but shaped like real ones (heavy-tailed
DEs whose size varies by head, ablated DEs shrunk toward 0, partial self-repair, ablated
norm scales near the clean ones), full float32 mantissas: compression depends on that.
It is cached under `benchmarks/.cache/` (git-ignored) and rebuilt when its spec changes.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

CACHE = Path(__file__).parent / ".cache"
VERSION = 3  # bump when the generator changes
TOP_P = 0.02  # the synthetic ingest's top_p
SEQ_LEN = 128
FULL = {"n_layers": 24, "n_heads": 16, "n_rows": 411, "batch_rows": 32}  # 411 × 127 × 384 = 20.04 M facts
QUICK = {"n_layers": 4, "n_heads": 4, "n_rows": 40, "batch_rows": 8}
QUERIES = ("head_top_self_repair", "layer_trend", "breakdown")

def _laplace(rng, scale, size) -> np.ndarray:
    return rng.laplace(0.0, 1.0, size).astype(np.float32) * np.asarray(scale, np.float32)


def build_store(root: Path, n_layers: int, n_heads: int, n_rows: int, batch_rows: int, seed: int = 0,
                seq_len: int = SEQ_LEN) -> Path:
    """Write the synthetic model folder `root/synthetic` and return `root`."""
    import pyarrow as pa

    from selfrepair.store import top_tokens
    from selfrepair.store.labels import head_label
    from selfrepair.store.model_store import ModelStore
    from selfrepair.store.writer import Writer

    rng = np.random.default_rng(seed)
    preds = seq_len - 1
    n_tokens = n_rows * preds
    folder = root / "synthetic"
    folder.mkdir(parents=True)
    ms = ModelStore(folder)
    writer = Writer.open(ms)
    writer.create({
        "model": {"name": "synthetic", "n_layers": n_layers, "n_heads": n_heads, "d_model": 1024, "d_mlp": 4096},
        "n_tokens": n_tokens, "n_rows": n_rows, "seq_len": seq_len,
        "config": {"top_p": TOP_P, "batch_size": batch_rows}, "ablations": ["resample"], "resample": {"samples": 1}})
    # Per-head DE size: log-normal across heads, growing with depth (late heads write more).
    depth = (np.arange(n_layers) / n_layers)[:, None]
    head_scale = (0.02 * np.exp(rng.normal(0, 0.8, (n_layers, n_heads))) * (1 + 2 * depth)).astype(np.float32)
    lh = n_layers * n_heads
    layer_col = np.repeat(np.arange(n_layers, dtype=np.int16), n_heads)
    head_col = np.tile(np.arange(n_heads, dtype=np.int16), n_layers)
    batches = []
    for r0 in range(0, n_rows, batch_rows):
        r1 = min(r0 + batch_rows, n_rows)
        tok = np.arange(r0 * preds, r1 * preds, dtype=np.int32)
        n = len(tok)
        ids = rng.integers(0, 50_000, n + 1)
        s = np.exp(rng.normal(np.log(3.0), 0.3, n)).astype(np.float32)  # clean final-norm scale
        logit = rng.normal(2.0, 3.0, n).astype(np.float32)
        tokens = pa.table({
            "token_index": tok, "row": (tok // preds).astype(np.int32), "pos": (tok % preds).astype(np.int16),
            "token_id": ids[:-1].astype(np.int32), "next_token_id": ids[1:].astype(np.int32),
            "token_str": [f"t{i}" for i in ids[:-1]], "next_token_str": [f"t{i}" for i in ids[1:]],
            "logit": logit, "ln_scale": s, "unembed_bias": rng.normal(0, 0.1, n).astype(np.float32),
            "loss": rng.gamma(2.0, 1.5, n).astype(np.float32), "de_other": rng.normal(0, 0.5, n).astype(np.float32)})
        de = _laplace(rng, head_scale.reshape(-1, 1), (lh, n))  # [layer·head, token]
        heads = pa.table({"layer": np.repeat(layer_col, n), "head": np.repeat(head_col, n),
                          "token_index": np.tile(tok, lh), "de": de.reshape(-1)})
        mlps = pa.table({"layer": np.repeat(np.arange(n_layers, dtype=np.int16), n),
                         "token_index": np.tile(tok, n_layers),
                         "de": _laplace(rng, 0.2, n_layers * n).reshape(-1)})
        shard = f"clean-{r0:08d}-{r1:08d}"
        writer.commit(shard, {"phase": "clean", "rows": [r0, r1]},
                      {"tokens": tokens, "head_effects": heads, "mlp_effects": mlps})
        batches.append((r0, r1, tok, de, s))
    # As ingest does after its clean pass: store each head's top-p% tokens at the run's top_p,
    # then the ablation sweep, each shard with its top-token slice `ablation_top`.
    top = top_tokens.write(writer, TOP_P)
    top_key = (top.column("layer").to_numpy().astype(np.int64) * n_heads + top.column("head").to_numpy()) \
        * n_tokens + top.column("token_index").to_numpy()
    unit_labels = [head_label(l, h) for l, h in zip(layer_col, head_col)]
    for r0, r1, tok, de, s in batches:
        n = len(tok)
        # Ablation: the head's DE mostly vanishes; heads and MLPs repair part of it.
        de_abl = de * rng.uniform(-0.2, 0.3, (lh, n)).astype(np.float32) + _laplace(rng, 0.002, (lh, n))
        lost = de_abl - de
        d_heads = -lost * rng.beta(2, 8, (lh, n)).astype(np.float32) + _laplace(rng, 0.01, (lh, n))
        d_mlps = -lost * rng.beta(2, 8, (lh, n)).astype(np.float32) + _laplace(rng, 0.02, (lh, n))
        ratio = np.exp(rng.normal(0, 0.01, (lh, n))).astype(np.float32)  # s / s_abl
        d_logit = lost + d_heads + d_mlps + _laplace(rng, 0.01, (lh, n))
        eff = pa.table({
            "ablation": pa.DictionaryArray.from_arrays(np.zeros(lh * n, np.int8), ["resample"]).cast(pa.string()),
            "sample": np.zeros(lh * n, np.int16),
            # Head units without a condition, as the ingest writes them (store/schema.py, UNITS.md).
            "condition": pa.DictionaryArray.from_arrays(np.zeros(lh * n, np.int8), [""]).cast(pa.string()),
            "unit": pa.DictionaryArray.from_arrays(np.repeat(np.arange(lh, dtype=np.int32), n), unit_labels
                                                   ).cast(pa.string()),
            "unit_kind": pa.DictionaryArray.from_arrays(np.zeros(lh * n, np.int8), ["head"]).cast(pa.string()),
            "layer": np.repeat(layer_col, n), "head": np.repeat(head_col, n),
            "token_index": np.tile(tok, lh), "d_logit": d_logit.reshape(-1), "ln_scale": (s / ratio).reshape(-1),
            "de": de_abl.reshape(-1), "de_base": de.reshape(-1), "d_de_heads": d_heads.reshape(-1),
            "d_de_mlps": d_mlps.reshape(-1)})
        key = (np.repeat(layer_col, n).astype(np.int64) * n_heads + np.repeat(head_col, n)) * n_tokens \
            + np.tile(tok, lh)
        rows = np.arange(r0, r1, dtype=np.int32)
        sources = pa.table({"sample": np.zeros(len(rows), np.int16), "row": rows,
                            "source_row": ((rows + batch_rows) % n_rows).astype(np.int32)})
        shard = f"abl-resample-s0-{r0:08d}-{r1:08d}-hall"
        writer.commit(shard, {"phase": "ablation", "rows": [r0, r1], "ablation": "resample", "sample": 0},
                      {"ablation_effects": eff, "ablation_top": eff.filter(pa.array(np.isin(key, top_key))),
                       "resample_sources": sources})
    writer.close()
    return root


def cached_store(spec: dict, log=print) -> Path:
    """The synthetic store root for `spec`, built on first use."""
    key = "-".join(f"{k}{v}" for k, v in sorted(spec.items()))
    root = CACHE / f"store-v{VERSION}-{key}"
    if not (root / "synthetic" / "manifest.json").is_file() or not (root / ".complete").is_file():
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        build_store(root, **spec)
        (root / ".complete").touch()
        log(f"  built synthetic store {root.name} in {time.perf_counter() - t0:.1f} s")
    return root


def run(ctx, repeats: int = 3) -> dict:
    """Seconds per named query (first call and best of `repeats`), and bytes per ablation row."""
    from selfrepair.queries.store import Store
    from selfrepair.store.model_store import ModelStore

    spec = QUICK if ctx.quick else FULL
    root = cached_store(spec, ctx.log)
    manifest = ModelStore(root / "synthetic").manifest()
    entries = [s.files["ablation_effects"] for s in manifest.shards.values() if "ablation_effects" in s.files]
    n_rows = sum(e.rows for e in entries)
    out = {"ablation_rows": n_rows, "bytes_per_row": sum(e.bytes for e in entries) / n_rows,
           "store": f"{spec['n_layers']} layers × {spec['n_heads']} heads × {manifest.n_tokens:,} tokens"}
    t0 = time.perf_counter()
    store = Store.open(root)
    out["open_s"] = time.perf_counter() - t0
    try:
        for name in QUERIES:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                frame = store.query(name, p=0.02)
                times.append(time.perf_counter() - t0)
            out[name] = {"first_s": times[0], "best_s": min(times), "rows": frame.height}
    finally:
        store.close()
    return out
