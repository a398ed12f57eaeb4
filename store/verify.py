"""`selfrepair verify`: check a store against its manifest and DESIGN.md's identities.

Checks every committed shard's files (present, sha256, readable, row count, schema),
key uniqueness per table, the Zarr arrays (shape, dimension names, chunk checksums,
every chunk decodable) and, on a sample of tokens, Σ DE = logit − b_U and the
LayerNorm closed form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from selfrepair.store import arrays, files
from selfrepair.store.model_store import ModelStore, list_models
from selfrepair.store.schema import ARRAYS, TABLES

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
    for ms in list_models(Path(root)):
        ok, bad = report.checked.setdefault(ms.name, []), report.problems.setdefault(ms.name, [])
        _verify_model(ms, ok, bad, seed)
    return report


def _verify_model(ms: ModelStore, ok: list[str], bad: list[str], seed: int) -> None:
    manifest = ms.manifest()  # a damaged or hostile manifest raises StoreError: nothing else can be checked
    shards = manifest.get("shards", {})
    readable: dict[str, list[Path]] = {t: [] for t in TABLES}
    n_files = 0
    listed = [(shard_id, table, entry) for shard_id in sorted(shards)
              for table, entry in shards[shard_id]["files"].items()]
    listed += [("derived", table, entry) for table, entry in sorted(manifest.get("derived", {}).items())]
    for shard_id, table, entry in listed:
        n_files += 1
        path = ms.path / entry["path"]
        if not path.is_file():
            bad.append(f"shard {shard_id}: {entry['path']} is missing")
            continue
        if files.sha256_file(path) != entry["sha256"]:
            bad.append(f"shard {shard_id}: {entry['path']} checksum mismatch")
            continue
        try:
            meta = pq.read_metadata(path)
        except Exception as e:  # noqa: BLE001
            bad.append(f"shard {shard_id}: {entry['path']} is not readable Parquet ({e})")
            continue
        if meta.num_rows != entry["rows"]:
            bad.append(f"shard {shard_id}: {entry['path']} has {meta.num_rows} rows, manifest says {entry['rows']}")
            continue
        if meta.schema.to_arrow_schema().names != TABLES[table].column_names:
            bad.append(f"shard {shard_id}: {entry['path']} columns differ from store/schema.py")
            continue
        readable[table].append(path)
    ok.append(f"{len(shards)} shards, {n_files} files: present, checksums, row counts, columns")
    _check_keys(readable, ok, bad)
    _check_arrays(ms, manifest, ok, bad)
    _check_identities(readable, ok, bad, seed)


def _check_keys(readable: dict[str, list[Path]], ok: list[str], bad: list[str]) -> None:
    for name, paths in readable.items():
        if not paths:
            continue
        key = list(TABLES[name].key)
        frame = pl.scan_parquet(paths).select(key)
        n = frame.select(pl.len()).collect().item()
        unique = frame.unique().select(pl.len()).collect().item()
        if unique != n:
            bad.append(f"table {name}: {n - unique} duplicate key(s) on ({', '.join(key)})")
        else:
            ok.append(f"table {name}: {n} rows, key ({', '.join(key)}) unique")


def _check_arrays(ms: ModelStore, manifest: dict, ok: list[str], bad: list[str]) -> None:
    expected = manifest.get("arrays")
    if not expected:
        return
    found = arrays.array_info(ms.arrays_path)
    for name, info in expected.items():
        if name not in found:
            bad.append(f"activations.zarr/{name}: missing")
        elif found[name]["shape"] != info["shape"] or found[name]["dims"] != info["dims"]:
            bad.append(f"activations.zarr/{name}: shape {found[name]['shape']} differs from manifest {info['shape']}")
        elif name in ARRAYS and found[name]["dims"] != list(ARRAYS[name].dims):
            bad.append(f"activations.zarr/{name}: dimension names {found[name]['dims']} differ from store/schema.py")
    n_chunks = 0
    for shard_id, shard in sorted(manifest.get("shards", {}).items()):
        for rel, digest in shard.get("chunks", {}).items():
            n_chunks += 1
            path = ms.path / rel
            if digest is None:
                continue
            if not path.is_file():
                bad.append(f"shard {shard_id}: chunk {rel} is missing")
            elif files.sha256_file(path) != digest:
                bad.append(f"shard {shard_id}: chunk {rel} checksum mismatch")
    for name in ARRAYS:
        if name in found:
            try:
                arrays.read_region(ms.arrays_path, name)
            except Exception as e:  # noqa: BLE001 - zarr/numcodecs raise many kinds on damage
                bad.append(f"activations.zarr/{name}: cannot be read ({type(e).__name__}: {e})")
    ok.append(f"activations.zarr: {len(expected)} arrays, {n_chunks} chunk checksums")


def _check_identities(readable: dict[str, list[Path]], ok: list[str], bad: list[str], seed: int) -> None:
    if not (readable["tokens"] and readable["head_effects"] and readable["mlp_effects"]):
        return
    tokens = pl.read_parquet(readable["tokens"], columns=["token_index", "logit", "ln_scale", "unembed_bias", "de_other"])
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(tokens["token_index"].to_numpy(), min(SAMPLE_TOKENS, tokens.height), replace=False))
    sample = pick.tolist()
    sel = lambda t: pl.scan_parquet(readable[t]).filter(pl.col("token_index").is_in(sample))  # noqa: E731
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
    abl = sel("ablation_effects").join(tokens.lazy(), on="token_index", suffix="_clean").join(
        pl.scan_parquet(readable["head_effects"]).rename({"de": "de_clean"}), on=["layer", "head", "token_index"])
    ratio = pl.col("ln_scale_clean") / pl.col("ln_scale")
    sr = pl.col("d_logit") - (pl.col("de") - pl.col("de_clean"))
    sr_ln = sr - pl.col("d_de_heads") - pl.col("d_de_mlps")
    closed = (ratio - 1) * (pl.col("logit") + pl.col("d_logit") - pl.col("unembed_bias")) / ratio
    err = abl.select((sr_ln.cast(pl.Float64) - closed).abs().max()).collect().item()
    if err is not None and err > IDENTITY_TOL:
        bad.append(f"identity sr_ln = closed form fails on sampled tokens (max error {err})")
    elif err is not None:
        ok.append(f"identity sr_ln = (s/s_abl − 1)·Σ DE_abl on sampled ablation rows (max error {err:.1e})")
