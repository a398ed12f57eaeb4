"""`selfrepair verify`: check a store against its manifest and DESIGN.md's identities.

Checks every committed shard's files (present, sha256, readable, row count, schema),
the shards against the recorded configuration, keys (unique within each shard, every
row inside its shard's declared rows, ablation, draw, condition and units — a unit's
kind, layer and head as its label says —, no two shards declaring the same (condition,
unit) on overlapping rows, which together make keys unique store-wide, and each
conditioned batch's baseline, `condition_tokens`, held by exactly one shard), the Zarr
arrays (shape, dimension names, chunk checksums, every chunk decodable) and, on a
sample of tokens, Σ DE = logit − b_U and the LayerNorm closed form. Everything streams
shard by shard and chunk by chunk, so memory does not grow with the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from selfrepair.errors import ConfigError, StoreError
from selfrepair.store import arrays, files
from selfrepair.store.heads import parse_heads
from selfrepair.store.manifest import Manifest, ShardEntry
from selfrepair.store.model_store import ModelStore, list_models
from selfrepair.store.plan import NEURON_PHASE, batches
from selfrepair.store.schema import ARRAYS, LEGACY_COLUMNS, TABLES, file_key

IDENTITY_TOL = 1e-3  # stored float32 sums over hundreds of components
SAMPLE_TOKENS = 2000


@dataclass
class Report:
    """Problems found per model; `ok` is true when there are none."""

    checked: dict[str, list[str]] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(self.problems.values())

    def lines(self) -> list[str]:
        out = []
        for model in sorted(self.checked):
            bad = self.problems.get(model, [])
            out.append(f"{model}: {'OK' if not bad else f'{len(bad)} problem(s)'}")
            out += [f"  ok   {c}" for c in self.checked[model]]
            out += [f"  FAIL {p}" for p in bad]
        return out


def verify(root: Path, seed: int = 0) -> Report:
    """Verify every model under a store root."""
    report = Report()
    for ms in list_models(Path(root), incomplete=True):
        ok, bad = report.checked.setdefault(ms.name, []), report.problems.setdefault(ms.name, [])
        _verify_model(ms, ok, bad, seed)
    return report


def _verify_model(ms: ModelStore, ok: list[str], bad: list[str], seed: int) -> None:
    if not ms.exists():
        bad.append(f"incomplete ingest: {ms.path} has no {ms.manifest_path.name} "
                   "(re-run the ingest, or delete the folder)")
        return
    manifest = ms.manifest()  # a damaged or hostile manifest raises StoreError: nothing else can be checked
    if not ms.has_clean_shard(manifest):
        bad.append(f"incomplete ingest: {ms.path} has no committed clean shard "
                   "(re-run the ingest, or delete the folder)")
    shards = manifest.shards
    readable: dict[str, list[Path]] = {t: [] for t in TABLES}
    n_files = 0
    listed = [(shard_id, table, entry) for shard_id in sorted(shards)
              for table, entry in shards[shard_id].files.items()]
    listed += [("derived", table, entry) for table, entry in sorted(manifest.derived.items())]
    listed += [("compacted", table, entry) for table, lst in sorted(manifest.compacted.items())
               for entry in lst]
    for shard_id, table, entry in listed:
        n_files += 1
        path = ms.path / entry.path
        problem = files.file_problem(path)  # lstat only: a symlink or FIFO is never opened
        if problem:
            bad.append(f"shard {shard_id}: {entry.path} {problem}")
            continue
        if files.sha256_file(path) != entry.sha256:
            bad.append(f"shard {shard_id}: {entry.path} checksum mismatch")
            continue
        try:
            meta = pq.read_metadata(path)
        except Exception as e:  # noqa: BLE001
            bad.append(f"shard {shard_id}: {entry.path} is not readable Parquet ({e})")
            continue
        if meta.num_rows != entry.rows:
            bad.append(f"shard {shard_id}: {entry.path} has {meta.num_rows} rows, manifest says {entry.rows}")
            continue
        names = meta.schema.to_arrow_schema().names
        if names != TABLES[table].column_names and tuple(names) not in LEGACY_COLUMNS.get(table, ()):
            bad.append(f"shard {shard_id}: {entry.path} columns differ from store/schema.py")
            continue
        readable[table].append(path)
    ok.append(f"{len(shards)} shards, {n_files} files: present, checksums, row counts, columns")
    good = {p for paths in readable.values() for p in paths}
    _check_shards(ms, manifest, good, ok, bad)
    _check_arrays(ms, manifest, ok, bad)
    _check_identities(readable, ok, bad, seed)
    _show_self_check(manifest, ok)


def _check_shards(ms: ModelStore, manifest: Manifest, good: set[Path], ok: list[str], bad: list[str]) -> None:
    """Per shard: the recorded configuration, keys unique, rows inside the declared units; across shards: no overlap."""
    n_layers, n_heads = manifest.model.n_layers, manifest.model.n_heads
    preds = manifest.seq_len - 1
    kinds = set(manifest.ablation_kinds)
    samples = manifest.resample.samples
    every_head = set(parse_heads("all", n_layers, n_heads))
    clean_rows: list[tuple[int, int, str]] = []
    # (phase, ablation, sample) -> (r0, r1, {(condition, unit)}, shard): one key, one shard
    units: dict[tuple[str, str, int], list[tuple[int, int, set, str]]] = {}
    detail: list[tuple[str, ShardEntry]] = []  # `neurons` shards, checked against their batch's ablation shards
    sources: dict[tuple[int, int, int], str] = {}
    baselines: dict[tuple[str, int, str, int, int], list[str]] = {}  # conditioned batch -> shards holding it
    rows_checked = 0
    for sid, e in sorted(manifest.shards.items()):
        r0, r1 = e.rows
        heads = declared = None
        if e.phase == "clean":
            clean_rows.append((r0, r1, sid))
            heads = every_head  # the clean pass stores every head of the model, no other
        else:
            kind, sample = e.draw
            if kind not in kinds or not (0 <= sample < (samples if kind == "resample" else 1)):
                bad.append(f"shard {sid}: ablation {kind} draw {sample} is not in the recorded configuration")
                continue
            try:
                shard_units = e.unit_list(n_layers, n_heads)
                cond = e.condition_label(n_layers, n_heads)
            except ConfigError as err:
                bad.append(f"shard {sid}: units {e.units or e.heads!r} do not fit the model ({err})")
                continue
            declared = {(cond, u.label, u.kind, u.layer, u.head) for u in shard_units}
            heads = {(u.layer, u.head) for u in shard_units if u.kind == "head"} if not cond else set()
            units.setdefault((e.phase, kind, sample), []).append((r0, r1, {d[:2] for d in declared}, sid))
            if e.phase == NEURON_PHASE:
                detail.append((sid, e))
            if cond:
                holders = baselines.setdefault((kind, sample, cond, r0, r1), [])
                if e.holds("condition_tokens"):
                    holders.append(sid)
            if e.holds("resample_sources"):
                if (sample, r0, r1) in sources:
                    bad.append(f"shard {sid}: resample_sources of rows {r0}..{r1} also in {sources[(sample, r0, r1)]}")
                sources[(sample, r0, r1)] = sid
        for table, f in e.files.items():
            path = ms.path / f.path
            if path in good:
                rows_checked += f.rows
                exact = e.phase == "clean" and table == "head_effects"
                problem = _check_file(TABLES[table], path, e, r0, r1, preds, heads, exact, declared)
                if problem:
                    bad.append(f"shard {sid}: {f.path} {problem}")
    for table, f in sorted(manifest.derived.items()):
        path = ms.path / f.path
        if path in good and _duplicates(path, list(TABLES[table].key)):
            bad.append(f"derived {table}: duplicate keys")
    for table, lst in sorted(manifest.compacted.items()):
        for f in lst:
            path = ms.path / f.path
            if path in good:
                rows_checked += f.rows
                if not _strictly_sorted(path, list(file_key(TABLES[table], pq.read_schema(path).names))):
                    bad.append(f"compacted {table}: {f.path} is not strictly sorted by its key (duplicates?)")
    clean_rows.sort()
    for (a0, a1, s1), (b0, b1, s2) in zip(clean_rows, clean_rows[1:]):
        if b0 < a1:
            bad.append(f"shards {s1} and {s2} overlap (rows {b0}..{min(a1, b1)})")
    covered = 0
    for r0, r1, _ in clean_rows:  # rows 0..covered are stored without a gap
        if r0 > covered:
            break
        covered = max(covered, r1)
    n_rows = manifest.n_rows
    if n_rows > covered:
        bad.append(f"the manifest counts {n_rows} rows ({manifest.n_tokens} tokens) but clean shards store "
                   f"rows 0..{covered} only (an interrupted ingest: rerun it)")
    if n_rows and preds > 0 and manifest.n_tokens != n_rows * preds:
        bad.append(f"the manifest counts {manifest.n_tokens} tokens, but {n_rows} rows of {preds} predictions "
                   f"make {n_rows * preds}")
    if n_rows and clean_rows and max(r1 for _, r1, _ in clean_rows) > n_rows:
        bad.append(f"clean shards claim rows up to {max(r1 for _, r1, _ in clean_rows)}, beyond the manifest's "
                   f"{n_rows} rows (an interrupted extension: rerun it)")
    for (phase, kind, sample), lst in sorted(units.items()):
        lst.sort(key=lambda u: u[0])
        for i, (a0, a1, ha, s1) in enumerate(lst):
            for b0, b1, hb, s2 in lst[i + 1:]:
                if b0 >= a1:
                    break
                if ha & hb:
                    bad.append(f"shards {s1} and {s2} overlap ({kind} draw {sample}, {len(ha & hb)} unit(s))")
    for (kind, sample, cond, r0, r1), holders in sorted(baselines.items()):
        if len(holders) != 1:
            which = "no shard holds" if not holders else f"{len(holders)} shards ({', '.join(holders)}) hold"
            bad.append(f"{kind} draw {sample} | {cond}, rows {r0}..{r1}: {which} its condition_tokens (the baseline "
                       "of its rows)")
    bad += _detail_overlaps(ms, manifest, detail, good)
    ok.append(f"{rows_checked} rows: keys unique within each shard and inside its declared rows, conditions and "
              f"units; no two shards overlap; ablations and draws as recorded")
    ok.append(_coverage(manifest, units))


def _coverage(manifest: Manifest, units: dict) -> str:
    """One line: per draw and condition, how many units cover every batch of the store's rows."""
    full = manifest.batch_size or max((r1 - r0 for r0, r1, *_ in
                                       (e.rows for e in manifest.shards.values())), default=0)
    want = set(batches(manifest.n_rows, full)) if full else set()
    per: dict[tuple, dict[str, set]] = {}
    for (phase, kind, sample), lst in units.items():
        if phase != "ablation":
            continue
        for r0, r1, pairs, _ in lst:
            for cond, unit in pairs:
                per.setdefault((kind, sample, cond), {}).setdefault(unit, set()).add((r0, r1))
    parts = []
    for (kind, sample, cond), got in sorted(per.items()):
        complete = sum(rows >= want for rows in got.values())
        parts.append(f"{kind} draw {sample}{' | ' + cond if cond else ''}: {complete} of {len(got)} unit(s) "
                     f"on all {len(want)} batches")
    return "coverage: " + ("; ".join(parts) if parts else "no ablation stored")


def _detail_overlaps(ms: ModelStore, manifest: Manifest, detail, good: set[Path]) -> list[str]:
    """A `neurons` shard's tokens must not also be detail tokens of its batch's ablation shards (one key, one row)."""
    out = []
    for sid, e in detail:
        f = e.files.get("neuron_totals")
        if f is None or ms.path / f.path not in good:
            continue
        mine = _head_rows(ms.path / f.path)
        for other, o in manifest.shards.items():
            g = o.files.get("neuron_totals")
            if (o.phase != "ablation" or o.draw != e.draw
                    or not (o.rows[0] < e.rows[1] and o.rows[1] > e.rows[0]) or g is None
                    or ms.path / g.path not in good):
                continue
            theirs = _head_rows(ms.path / g.path)
            n = mine.join(theirs, on=["layer", "head", "token_index"]).height
            if n:
                out.append(f"shards {sid} and {other} both hold neuron detail of {n} (head, token) pair(s)")
    return out


def _head_rows(path: Path) -> pl.DataFrame:
    """(layer, head, token_index) of a neuron_totals file's unconditioned head-unit rows (the per-head detail)."""
    frame = pl.scan_parquet(path, glob=False)
    if "unit" in pq.read_schema(path).names:
        frame = frame.filter((pl.col("condition") == "") & (pl.col("unit_kind") == "head"))
    return frame.select("layer", "head", "token_index").collect()


def _strictly_sorted(path: Path, key: list[str], batch_rows: int = 1 << 20) -> bool:
    """Whether a compacted file's keys strictly increase, batch by batch: unique keys in bounded memory."""
    prev = None
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=key):
        cols = [np.asarray(batch.column(k).to_numpy(zero_copy_only=False)) for k in key]
        if prev is not None:
            cols = [np.concatenate([p, c]) for p, c in zip(prev, cols)]
        # cmp[i]: how row i+1 compares with row i on the key, first differing column deciding.
        cmp = np.zeros(len(cols[0]) - 1, dtype=np.int8)
        for c in cols:
            undecided = cmp == 0
            a, b = c[:-1], c[1:]
            cmp[undecided & (b > a)] = 1
            cmp[undecided & (b < a)] = -1
        if not (cmp == 1).all():
            return False
        prev = [c[-1:] for c in cols]
    return True


def _duplicates(path: Path, key: list[str]) -> int:
    frame = pl.read_parquet(path, columns=key, glob=False)
    return frame.height - frame.unique().height


def _check_file(table, path: Path, entry: ShardEntry, r0: int, r1: int, preds: int, heads: set | None,
                exact: bool = False, declared: set | None = None) -> str | None:
    """One shard file: unique keys, every row inside the shard's declared rows, draw, condition and units
    (`declared`: (condition, unit, unit_kind, layer, head) rows; a file written before units: its
    (layer, head) inside `heads`; `exact`: all heads)."""
    names = pq.read_schema(path).names
    key = list(file_key(table, names))
    frame = pl.read_parquet(path, columns=key, glob=False)
    dup = frame.height - frame.unique().height
    if dup:
        return f"has {dup} duplicate key(s) on ({', '.join(key)})"
    if not frame.height:
        return None
    if "token_index" in key and preds > 0:
        lo, hi = frame["token_index"].min(), frame["token_index"].max()
        if lo < r0 * preds or hi >= r1 * preds:
            return f"holds token_index {lo}..{hi}, outside its rows {r0}..{r1}"
    if "row" in key and (frame["row"].min() < r0 or frame["row"].max() >= r1):
        return f"holds rows outside {r0}..{r1}"
    if "ablation" in key and set(frame["ablation"].unique()) != {entry.ablation}:
        return f"holds ablations other than {entry.ablation}"
    if "sample" in key and set(frame["sample"].unique()) != {entry.sample}:
        return f"holds draws other than {entry.sample}"
    if declared is not None and "condition" in names:
        cols = [c for c in ("condition", "unit", "unit_kind", "layer", "head") if c in names]
        got = set(pl.read_parquet(path, columns=cols, glob=False).unique().iter_rows())
        want = {d for d in declared} if len(cols) == 5 else {(d[0],) for d in declared}  # condition_tokens
        if not got <= want:
            odd = sorted(got - want)[0]
            return (f"holds {len(got - want)} (condition, unit) row kind(s) its entry does not declare "
                    f"(e.g. {' / '.join(map(str, odd))})")
    elif heads is not None and "head" in key:
        got = set(frame.select("layer", "head").unique().iter_rows())
        if not got <= heads:
            return f"holds {len(got - heads)} head(s) its entry does not declare"
        if exact and got != heads:
            return (f"holds {len(got)} heads, not the {len(heads)} of the manifest's model "
                    "(the model's layers or heads differ from what was stored)")
    return None


def _show_self_check(manifest: Manifest, ok: list[str]) -> None:
    """The ingest's own self-check deviations, when the engine recorded them."""
    check = manifest.self_check
    if not isinstance(check, dict) or not isinstance(check.get("deviations"), dict) or not check["deviations"]:
        return
    devs = check["deviations"]
    worst = max(devs, key=lambda k: devs[k])
    ok.append(f"ingest self-check ({check.get('bridge', 'bridge')}): {len(devs)} comparisons on the first batch, "
              f"largest deviation {devs[worst]:.1e} ({worst}); tolerance {check.get('tolerance')}"
              + (f"; {len(check['excused'])} comparison(s) with the bridge excused (the bridge disagrees with the "
                 "model's own forward, the engine agrees)" if check.get("excused") else ""))


def _check_arrays(ms: ModelStore, manifest: Manifest, ok: list[str], bad: list[str]) -> None:
    expected = manifest.arrays_json()
    if not expected:
        return
    try:  # the same check as Store.activations(): no symlink, FIFO or oversized metadata; shapes fit the model
        found, misfit = arrays.checked_arrays(ms.arrays_path, manifest)
    except StoreError as e:
        bad.append(str(e))
        return
    readable = set()
    for name, info in expected.items():
        if name not in found:
            bad.append(f"activations.zarr/{name}: missing")
        elif name in misfit:
            bad.append(f"activations.zarr/{name}: {misfit[name]}")
        elif found[name]["shape"] != info["shape"] or found[name]["dims"] != info["dims"]:
            bad.append(f"activations.zarr/{name}: shape {found[name]['shape']} differs from manifest {info['shape']}")
        elif name in ARRAYS and found[name]["dims"] != list(ARRAYS[name].dims):
            bad.append(f"activations.zarr/{name}: dimension names {found[name]['dims']} differ from store/schema.py")
        else:
            readable.add(name)
    n_chunks = 0
    for shard_id, shard in sorted(manifest.shards.items()):
        for rel, digest in shard.chunks.items():
            n_chunks += 1
            if digest is None:
                continue
            path = files.inside(ms.path, rel)  # no symlink out before a chunk is opened
            problem = files.file_problem(path)
            if problem:
                bad.append(f"shard {shard_id}: chunk {rel} {problem}")
            elif files.sha256_file(path) != digest:
                bad.append(f"shard {shard_id}: chunk {rel} checksum mismatch")
    for name in ARRAYS:
        if name in readable:  # only arrays whose shape was checked: a claimed 10^15 tokens is never iterated
            # Chunk by chunk: a whole array can be tens of GB.
            for start, stop in arrays.chunk_ranges(ms.arrays_path, name):
                try:
                    arrays.read_region(ms.arrays_path, name, start, stop)
                except Exception as e:  # noqa: BLE001 - zarr/numcodecs raise many kinds on damage
                    bad.append(f"activations.zarr/{name}: cannot be read ({type(e).__name__}: {e})")
                    break
    ok.append(f"activations.zarr: {len(expected)} arrays, {n_chunks} chunk checksums")


def _check_identities(readable: dict[str, list[Path]], ok: list[str], bad: list[str], seed: int) -> None:
    if not (readable["tokens"] and readable["head_effects"] and readable["mlp_effects"]):
        return
    tokens = pl.read_parquet(readable["tokens"], columns=["token_index", "logit", "ln_scale", "unembed_bias", "de_other"],
                             glob=False)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(tokens["token_index"].to_numpy(), min(SAMPLE_TOKENS, tokens.height), replace=False))
    sample = pick.tolist()
    sel = lambda t: pl.scan_parquet(readable[t], glob=False).filter(pl.col("token_index").is_in(sample))  # noqa: E731
    heads = sel("head_effects").group_by("token_index").agg(pl.col("de").cast(pl.Float64).sum().alias("h"))
    mlps = sel("mlp_effects").group_by("token_index").agg(pl.col("de").cast(pl.Float64).sum().alias("m"))
    t = tokens.lazy().filter(pl.col("token_index").is_in(sample)).join(heads, on="token_index").join(mlps, on="token_index")
    err = t.select((pl.col("de_other") + pl.col("h") + pl.col("m") - pl.col("logit") + pl.col("unembed_bias"))
                   .abs().max()).collect().item()
    if err is None or err > IDENTITY_TOL:
        bad.append(f"identity Σ DE = logit − b_U fails on sampled tokens (max error {err})")
    else:
        ok.append(f"identity Σ DE = logit − b_U on {len(pick)} sampled tokens (max error {err:.1e})")
    if not readable["ablation_effects"]:
        return
    layouts: dict[bool, list[Path]] = {}
    for p in readable["ablation_effects"]:
        layouts.setdefault("de_base" in pq.read_schema(p).names, []).append(p)
    frames = []
    for with_units, paths in layouts.items():
        abl = pl.scan_parquet(paths, glob=False).filter(pl.col("token_index").is_in(sample))
        if not with_units:  # written before units: one head, unconditioned, its clean DE in head_effects
            abl = abl.join(sel("head_effects").rename({"de": "de_base"}), on=["layer", "head", "token_index"]) \
                .with_columns(condition=pl.lit(""))
        frames.append(abl.select("ablation", "sample", "condition", "token_index", "d_logit", "ln_scale", "de",
                                 "de_base", "d_de_heads", "d_de_mlps"))
    abl = pl.concat(frames).join(tokens.lazy().select("token_index", "logit", "unembed_bias",
                                                       pl.col("ln_scale").alias("ln_scale_clean")), on="token_index")
    if readable["condition_tokens"]:  # a conditioned row's baseline is the condition-ablated run
        base = pl.scan_parquet(readable["condition_tokens"], glob=False).filter(pl.col("token_index").is_in(sample))
        abl = abl.join(base.rename({"logit": "logit_base", "ln_scale": "ln_scale_base"}),
                       on=["ablation", "sample", "condition", "token_index"], how="left")
        abl = abl.with_columns(
            logit=pl.when(pl.col("condition") == "").then(pl.col("logit")).otherwise(pl.col("logit_base")),
            ln_scale_clean=pl.when(pl.col("condition") == "").then(pl.col("ln_scale_clean"))
            .otherwise(pl.col("ln_scale_base")))
    ratio = pl.col("ln_scale_clean") / pl.col("ln_scale")
    sr = pl.col("d_logit") - (pl.col("de") - pl.col("de_base"))
    sr_ln = sr - pl.col("d_de_heads") - pl.col("d_de_mlps")
    closed = (ratio - 1) * (pl.col("logit") + pl.col("d_logit") - pl.col("unembed_bias")) / ratio
    err = abl.select((sr_ln.cast(pl.Float64) - closed).abs().max()).collect().item()
    if err is not None and err > IDENTITY_TOL:
        bad.append(f"identity sr_ln = closed form fails on sampled tokens (max error {err})")
    elif err is not None:
        ok.append(f"identity sr_ln = (s/s_abl − 1)·Σ DE_abl on sampled ablation rows (max error {err:.1e})")
