"""Reads at scale (issue 8, item 4): open and query times before and after compaction, and on big stores.

Usage:
    python benchmarks/bench_scale.py [--many 250000,1000000] [--big 21000000,63000000,211000000] [--quick]

(a) Many shards: the synthetic store of `bench_queries.py` written through `store.Writer`
    as an ingest of the tiny 2-layer × 4-head GPT-2 would write it (seq-len 64, batch 8:
    one clean and one ablation shard per batch, ~3,970 shards at 1 M tokens). `Store.open`
    and `head_top_self_repair` (p = 0.02, Figure 1) are timed before and after
    `selfrepair compact`, at each token count.
(b) Big stores: 24 layers × 16 heads × N tokens written already compacted (one sorted
    file per table, as `compact` leaves it) straight with pyarrow, a layer at a time;
    timed: the Figure-1 query and a per-layer aggregate over every `ablation_effects` row.

Each timing is the best of REPEATS after one first call (shown in brackets). Stores live
under `benchmarks/.cache/scale-*` (git-ignored) and are rebuilt when missing.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import bench_queries  # noqa: E402

CACHE = Path(__file__).parent / ".cache"
REPEATS = 3
TINY = {"n_layers": 2, "n_heads": 4, "batch_rows": 8, "seq_len": 64}
BIG_SHAPE = (24, 16)
BIG_SEQ = 128
LAYER_AGG = ("SELECT layer, count(*) AS n, avg(d_logit) AS d_logit, avg(de) AS de_ablated, "
             "avg(d_de_heads) AS sr_heads, avg(d_de_mlps) AS sr_mlps FROM ablation_effects GROUP BY layer ORDER BY layer")


def _time(fn) -> tuple[float, float]:
    """(first call, best of REPEATS) seconds."""
    times = []
    for _ in range(REPEATS + 1):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times[0], min(times[1:])


def _open_and_query(root: Path) -> dict:
    from selfrepair.queries.store import Store

    opened = []
    out = {"open": _time(lambda: opened.append(Store.open(root)))}
    store = opened[-1]
    out["fig1"] = _time(lambda: store.query("head_top_self_repair", p=0.02))
    for s in opened:
        s.close()
    return out


def many_shards(tokens: int, log=print) -> dict:
    """(a): one synthetic tiny-model store of `tokens` tokens, timed before and after compaction."""
    from selfrepair.store.compact import compact
    from selfrepair.store.model_store import ModelStore

    preds = TINY["seq_len"] - 1
    n_rows = math.ceil(tokens / preds / TINY["batch_rows"]) * TINY["batch_rows"]
    root = CACHE / f"scale-many-{n_rows}"
    shutil.rmtree(root, ignore_errors=True)  # compaction changes it: always start from shards
    t0 = time.perf_counter()
    bench_queries.build_store(root, n_rows=n_rows, **TINY)
    log(f"  built {root.name} in {time.perf_counter() - t0:.0f} s")
    manifest = ModelStore(root / "synthetic").manifest()
    rows = sum(s.files["ablation_effects"].rows for s in manifest.shards.values() if "ablation_effects" in s.files)
    out = {"tokens": manifest.n_tokens, "ablation_rows": rows, "shards": len(manifest.shards),
           "files": sum(len(s.files) for s in manifest.shards.values())}
    out["before"] = _open_and_query(root)
    t0 = time.perf_counter()
    out["files_after"] = compact(root)[0].files_after
    out["compact_s"] = time.perf_counter() - t0
    out["after"] = _open_and_query(root)
    shutil.rmtree(root, ignore_errors=True)
    return out


def build_big(root: Path, n_tokens: int, seed: int = 0) -> Path:
    """(b): a compacted synthetic store of 24 × 16 heads × `n_tokens`, one sorted file per table."""
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    from selfrepair.store import files
    from selfrepair.store.compacted_files import ROW_GROUP_ROWS
    from selfrepair.store.model_store import ModelStore
    from selfrepair.store.schema import TABLES
    from selfrepair.store.writer import Writer

    n_layers, n_heads = BIG_SHAPE
    preds = BIG_SEQ - 1
    n_rows = math.ceil(n_tokens / preds)
    n = n_rows * preds
    rng = np.random.default_rng(seed)
    ms = ModelStore(root / "synthetic")
    writer = Writer.open(ms)
    writer.create({"model": {"name": "synthetic", "n_layers": n_layers, "n_heads": n_heads, "d_model": 1024,
                             "d_mlp": 4096}, "n_tokens": n, "n_rows": n_rows, "seq_len": BIG_SEQ,
                   "config": {"top_p": bench_queries.TOP_P}, "ablations": ["resample"],
                   "resample": {"samples": 1}})
    tok = np.arange(n, dtype=np.int32)
    s = np.exp(rng.normal(np.log(3.0), 0.3, n)).astype(np.float32)
    ids = rng.integers(0, 50_000, n + 1)
    tokens = pa.table({
        "token_index": tok, "row": tok // preds, "pos": (tok % preds).astype(np.int16),
        "token_id": ids[:-1].astype(np.int32), "next_token_id": ids[1:].astype(np.int32),
        "token_str": pa.array([f"t{i}" for i in ids[:-1]]), "next_token_str": pa.array([f"t{i}" for i in ids[1:]]),
        "logit": rng.normal(2.0, 3.0, n).astype(np.float32), "ln_scale": s,
        "unembed_bias": rng.normal(0, 0.1, n).astype(np.float32),
        "loss": rng.gamma(2.0, 1.5, n).astype(np.float32), "de_other": rng.normal(0, 0.5, n).astype(np.float32)})
    keep = math.floor(bench_queries.TOP_P * n)
    paths = {t: ms.shard_file(t, "compact-bench") for t in
             ("tokens", "head_effects", "mlp_effects", "ablation_effects", "ablation_top")}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    writers = {t: pq.ParquetWriter(paths[t], TABLES[t].arrow_schema, compression="zstd")
               for t in ("head_effects", "mlp_effects", "ablation_effects", "ablation_top")}
    pq.write_table(tokens.cast(TABLES["tokens"].arrow_schema), paths["tokens"], compression="zstd", row_group_size=ROW_GROUP_ROWS)
    top = []

    def put(t: str, cols) -> None:
        table = cols if isinstance(cols, pa.Table) else pa.table(cols)
        writers[t].write_table(table.cast(TABLES[t].arrow_schema), ROW_GROUP_ROWS)
    lap = lambda scale, size: rng.laplace(0, 1, size).astype(np.float32) * np.float32(scale)  # noqa: E731
    for layer in range(n_layers):
        put("mlp_effects", {"layer": np.full(n, layer, np.int16), "token_index": tok, "de": lap(0.2, n)})
        for head in range(n_heads):
            # Sorted by (layer, head, token_index), as compaction leaves the files.
            de = lap(0.02 * math.exp(rng.normal(0, 0.8)) * (1 + 2 * layer / n_layers), n)
            lh = {"layer": np.full(n, layer, np.int16), "head": np.full(n, head, np.int16), "token_index": tok}
            put("head_effects", lh | {"de": de})
            order = np.lexsort((tok, -de))[:keep]  # largest DE first, ties to the lower index
            top.append(pa.table({"layer": lh["layer"][:keep], "head": lh["head"][:keep],
                                 "token_index": tok[order], "de": de[order]}))
            de_abl = de * rng.uniform(-0.2, 0.3, n).astype(np.float32)
            lost = de_abl - de
            d_heads = -lost * np.float32(0.2) + lap(0.01, n)
            d_mlps = -lost * np.float32(0.2) + lap(0.02, n)
            abl = pa.table({
                "ablation": pa.array(["resample"] * 1, pa.string()).take(np.zeros(n, np.int32)),
                "sample": np.zeros(n, np.int16), **lh, "d_logit": lost + d_heads + d_mlps + lap(0.01, n),
                "ln_scale": s * np.exp(rng.normal(0, 0.01, n)).astype(np.float32), "de": de_abl,
                "d_de_heads": d_heads, "d_de_mlps": d_mlps})
            put("ablation_effects", abl)
            put("ablation_top", abl.take(np.sort(order)))  # the ingest's top-token slice
    for w in writers.values():
        w.close()
    entries = {}
    for t, p in paths.items():
        entries[t] = [{"path": str(p.relative_to(ms.path)), "rows": pq.read_metadata(p).num_rows,
                       "bytes": p.stat().st_size, "sha256": files.sha256_file(p)}]
    writer.commit_compaction(entries, [])
    top_table = pl.from_arrow(pa.concat_tables(top)).sort(["layer", "head", "token_index"]).to_arrow()
    writer.write_derived("head_top_tokens", top_table, {"n_tokens": n, "top_p": bench_queries.TOP_P})
    writer.close()
    return root


def add_top_slice(root: Path) -> None:
    """Bring a big store cached by an older `build_big` up to date: its `ablation_top` slice and
    recorded ablations, as `build_big` now writes them."""
    import duckdb

    from selfrepair.store import files
    from selfrepair.store.model_store import ModelStore
    from selfrepair.store.writer import Writer

    ms = ModelStore(root / "synthetic")
    writer = Writer.open(ms)
    compacted = {t: [dict(f.raw) for f in lst] for t, lst in writer.manifest.compacted.items()}
    if "ablation_top" not in compacted:
        path = ms.shard_file("ablation_top", "compact-bench")
        path.parent.mkdir(parents=True, exist_ok=True)
        abl = ms.path / compacted["ablation_effects"][0]["path"]
        top = ms.path / writer.manifest.derived["head_top_tokens"].path
        duckdb.sql(f"COPY (SELECT a.* FROM read_parquet('{abl}') a SEMI JOIN read_parquet('{top}') t "
                   "USING (layer, head, token_index) ORDER BY layer, head, token_index) "
                   f"TO '{path}' (FORMAT parquet, COMPRESSION zstd)")
        entry = {"path": str(path.relative_to(ms.path)), "rows": pq_rows(path), "bytes": path.stat().st_size,
                 "sha256": files.sha256_file(path)}
        writer.commit_compaction(compacted | {"ablation_top": [entry]}, [])
    if not writer.manifest.ablations:  # cached before the manifest recorded it
        writer.set(ablations=["resample"], resample={"samples": 1})
    writer.close()


def pq_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def big(tokens: int, log=print) -> dict:
    from selfrepair.queries.store import Store

    n_layers, n_heads = BIG_SHAPE
    root = CACHE / f"scale-big-{tokens}"
    if not (root / ".complete").is_file():
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        build_big(root, tokens)
        (root / ".complete").touch()
        log(f"  built {root.name} in {time.perf_counter() - t0:.0f} s")
    add_top_slice(root)
    store = Store.open(root)
    n = store.manifest("synthetic").n_tokens
    out = {"tokens": n, "ablation_rows": n * n_layers * n_heads,
           "fig1": _time(lambda: store.query("head_top_self_repair", p=0.02)),
           "layer_agg": _time(lambda: store.sql(LAYER_AGG))}
    store.close()
    return out


def table(many: list[dict], bigs: list[dict]) -> list[tuple[str, ...]]:
    def t(pair):
        return f"{pair[1]:.3f} s ({pair[0]:.3f})"

    lines = [("figure", "measured: best (first)", "target", "")]
    for r in many:
        tag = f"{r['tokens']:,} tokens, {r['ablation_rows']:,} abl rows, {r['shards']:,} shards"
        judged = r["tokens"] >= 1_000_000
        for key, target in (("open", 0.2), ("fig1", 1.0)):
            name = "Store.open" if key == "open" else "head_top_self_repair"
            for when in ("before", "after"):
                v = r[when][key][1]
                verdict = ("PASS" if v <= target else "MISS") if judged and when == "after" else ""
                lines.append((f"(a) {tag}: {name}, {when} compaction", t(r[when][key]),
                              f"≤ {target} s" if judged else "", verdict))
        lines.append((f"(a) {tag}: compaction ({r['files']:,} files -> {r['files_after']})", f"{r['compact_s']:.1f} s", "", ""))
    for r in bigs:
        tag = f"{r['tokens']:,} tokens, {r['ablation_rows']:,} abl rows"
        judged = r["ablation_rows"] >= 200_000_000
        for key, name, target in (("fig1", "head_top_self_repair", 2.0), ("layer_agg", "per-layer aggregate", 15.0)):
            v = r[key][1]
            lines.append((f"(b) {tag}: {name}", t(r[key]), f"< {target:g} s" if judged else "",
                          ("PASS" if v < target else "MISS") if judged else ""))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--many", default="250000,1000000", help="token counts for (a)")
    parser.add_argument("--big", default="55000,165000,550000", help="token counts for (b), 24 × 16 heads each")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.many, args.big = "5000", "5000"
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    many = [many_shards(int(x), log) for x in args.many.split(",") if x]
    bigs = [big(int(x), log) for x in args.big.split(",") if x]
    lines = table(many, bigs)
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
