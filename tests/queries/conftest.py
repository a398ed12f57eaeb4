"""A small synthetic store (two models) whose numbers satisfy DESIGN.md's identities.

Clean run: de_other = logit - b_U - sum(head DE) - sum(MLP DE), so the DE identity holds.
Ablated run: pick X = logit_abl - b_U and r = ln_ratio; then d_logit = X + b_U - logit,
sr_ln = (r - 1) X / r, and d_de_mlps = d_logit - d_de - d_de_heads - sr_ln, so the
self-repair decomposition and its LN closed form hold by construction.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from selfrepair.store import files
from selfrepair.store.model_store import ModelStore
from selfrepair.store.schema import LEGACY_COLUMNS, METRIC_COLUMNS, TABLES, without_metrics
from selfrepair.store.writer import commit_shard, write_manifest
from units_store import metrics

MODELS = {"gpt2-tiny": (2, 3, 40), "pythia-tiny": (3, 2, 30)}  # name -> layers, heads, tokens
SEQ_LEN = 10
TOP_P = 0.1
D_MLP = 8


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)


def _table(name: str, cols: dict, legacy: bool = False) -> pa.Table:
    """Rows as the table's schema; `legacy`: as a store written before units holds them (LEGACY_COLUMNS)."""
    table = pa.table(cols).cast(TABLES[name].arrow_schema) if cols else None
    if legacy and table is not None and name in LEGACY_COLUMNS:
        table = table.select(list(LEGACY_COLUMNS[name][0]))
    elif legacy and table is not None and name in METRIC_COLUMNS:  # before output metrics too
        table = table.select(list(without_metrics(name)))
    return table


def _write_files(ms: ModelStore, shard_id: str, tables: dict) -> dict:
    """`ModelStore.write_shard_files`, which writes the schema's layout only, and files of an older layout
    as they are (what a store written before units holds)."""
    old = {n: t for n, t in tables.items() if t is not None and t.column_names != TABLES[n].column_names}
    entries = ms.write_shard_files(shard_id, {n: t for n, t in tables.items() if n not in old})
    for name, table in old.items():
        path = ms.shard_file(name, shard_id)
        size, digest = files.write_parquet(path, table)
        entries[name] = {"path": str(path.relative_to(ms.path)), "rows": table.num_rows, "bytes": size,
                         "sha256": digest}
    return entries


def _unit_cols(layer: int, head: int) -> tuple:
    """An unconditioned head unit's columns (what the views fill in for a legacy file)."""
    return ("condition", ""), ("unit", f"L{layer}H{head}"), ("unit_kind", "head")


def make_model(path: Path, n_layers: int, n_heads: int, n_tokens: int, seed: int, legacy: bool = False) -> ModelStore:
    """Write one model folder with a clean shard and an ablation shard (`legacy`: in the layout before units)."""
    rng = np.random.default_rng(seed)
    ms = ModelStore(path)
    path.mkdir(parents=True)
    write_manifest(ms,
        {
            "model": {"name": path.name, "n_layers": n_layers, "n_heads": n_heads, "d_model": 16, "d_mlp": D_MLP},
            "n_tokens": n_tokens,
            "config": {"top_p": TOP_P},
            "shards": {},
        }
    )
    t = np.arange(n_tokens)
    # Rounded to 0.1 so many heads have ties in clean DE (tests the token_index tie rule).
    head_de = np.round(rng.normal(size=(n_layers, n_heads, n_tokens)), 1)
    mlp_de = rng.normal(size=(n_layers, n_tokens))
    logit = rng.normal(2.0, 1.0, n_tokens)
    bias = rng.normal(0.0, 0.1, n_tokens)
    scale = rng.uniform(0.5, 2.0, n_tokens)
    de_other = logit - bias - head_de.sum((0, 1)) - mlp_de.sum(0)
    tokens = {
        "token_index": t,
        "row": t // SEQ_LEN,
        "pos": t % SEQ_LEN,
        "token_id": rng.integers(0, 100, n_tokens),
        "next_token_id": rng.integers(0, 100, n_tokens),
        "token_str": [f"tok{i}" for i in t],
        "next_token_str": [f"tok{i + 1}" for i in t],
        "logit": logit,
        "ln_scale": scale,
        "unembed_bias": bias,
        "loss": rng.uniform(0, 5, n_tokens),
        "de_other": de_other,
        "entropy": np.random.default_rng(100 + seed).uniform(0, 5, n_tokens),  # its own generator: the rest keep theirs
    }
    L, H, T = np.meshgrid(np.arange(n_layers), np.arange(n_heads), t, indexing="ij")
    heads = {"layer": L.ravel(), "head": H.ravel(), "token_index": T.ravel(), "de": head_de.ravel()}
    mL, mT = np.meshgrid(np.arange(n_layers), t, indexing="ij")
    mlps = {"layer": mL.ravel(), "token_index": mT.ravel(), "de": mlp_de.ravel()}
    entries = ms.write_shard_files(
        "clean-0000",
        {"tokens": _table("tokens", tokens, legacy), "head_effects": _table("head_effects", heads), "mlp_effects": _table("mlp_effects", mlps)},
    )
    commit_shard(ms, "clean-0000", {"phase": "clean", "rows": [0, n_tokens // SEQ_LEN], "files": entries})

    # Ablation facts for every head and token, resample sample 0 and zero ablation.
    ab = {k: [] for k in TABLES["ablation_effects"].column_names}
    rep = {k: [] for k in TABLES["repair_sources"].column_names}
    neu = {k: [] for k in TABLES["neuron_effects"].column_names}
    tot = {k: [] for k in TABLES["neuron_totals"].column_names}
    k_top = int(np.floor(TOP_P * n_tokens))
    for ablation in ("resample", "zero"):
        for l in range(n_layers):
            for h in range(n_heads):
                de = head_de[l, h]
                x = logit - bias + rng.normal(0, 0.5, n_tokens)  # logit_abl - b_U
                r = rng.uniform(0.8, 1.3, n_tokens)  # ln_ratio = s / s_abl
                d_logit = x + bias - logit
                de_abl = de * rng.uniform(-0.2, 0.3, n_tokens)
                d_de = de_abl - de
                d_heads = rng.normal(0, 0.3, n_tokens)
                sr_ln = (r - 1) * x / r
                d_mlps = d_logit - d_de - d_heads - sr_ln
                for col, v in (("d_logit", d_logit), ("ln_scale", scale / r), ("de", de_abl), ("d_de_heads", d_heads), ("d_de_mlps", d_mlps), ("token_index", t)):
                    ab[col].extend(v.tolist())
                for col, v in (("ablation", ablation), ("sample", 0), ("layer", l), ("head", h)) + _unit_cols(l, h):
                    ab[col].extend([v] * n_tokens)
                ab["de_base"].extend(de.tolist())
                for col, v in metrics(n_tokens, seed * 1000 + l * 100 + h * 10 + (ablation == "zero")).items():
                    ab[col].extend(v.tolist())
                top = sorted(t, key=lambda i: (-de[i], i))[:k_top]
                for i in top:
                    for src_l in range(l, n_layers):
                        for src_h in list(range(n_heads)) + [-1]:
                            if src_l == l and src_h != -1:
                                continue
                            for col, v in (("ablation", ablation), ("sample", 0), ("layer", l), ("head", h), ("token_index", int(i)),
                                           ("src_kind", "mlp" if src_h < 0 else "head"), ("src_layer", src_l), ("src_head", src_h), ("d_de", float(rng.normal(0.1, 0.2)))) + _unit_cols(l, h):
                                rep[col].append(v)
                    clean = rng.normal(-0.1, 0.3, 3)
                    change = rng.normal(0.05, 0.1, 3)
                    # Three of D_MLP neurons kept: the top two and the bottom one by signed change.
                    ranks = dict(zip(np.argsort(-change, kind="stable"), (1, 2, D_MLP)))
                    for n in range(3):
                        for col, v in (("ablation", ablation), ("sample", 0), ("layer", l), ("head", h), ("token_index", int(i)),
                                       ("neuron", n), ("rank", ranks[n]), ("de_clean", float(clean[n])),
                                       ("de_ablated", float(clean[n] + change[n]))) + _unit_cols(l, h):
                            neu[col].append(v)
                    for col, v in (("ablation", ablation), ("sample", 0), ("layer", l), ("head", h), ("token_index", int(i)),
                                   ("d_de_sum", change.sum()), ("d_de_abs_sum", np.abs(change).sum()),
                                   ("d_de_pos_sum", np.maximum(change, 0).sum())) + _unit_cols(l, h):
                        tot[col].append(float(v) if isinstance(v, np.floating) else v)
    n_rows = n_tokens // SEQ_LEN
    sources = {"sample": [0] * n_rows, "row": list(range(n_rows)), "source_row": [(i + 1) % n_rows for i in range(n_rows)]}
    entries = _write_files(ms,
        "ablation-0000",
        {
            "ablation_effects": _table("ablation_effects", ab, legacy),
            "repair_sources": _table("repair_sources", rep, legacy),
            "neuron_effects": _table("neuron_effects", neu, legacy),
            "neuron_totals": _table("neuron_totals", tot, legacy),
            "resample_sources": _table("resample_sources", sources),
        },
    )
    commit_shard(ms, "ablation-0000", {"phase": "ablation", "rows": [0, n_rows], "files": entries})
    return ms


@pytest.fixture(scope="session")
def store_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store")
    for i, (name, (n_layers, n_heads, n_tokens)) in enumerate(MODELS.items()):
        make_model(root / name, n_layers, n_heads, n_tokens, seed=i)
    return root


@pytest.fixture(scope="session")
def legacy_root(tmp_path_factory) -> Path:
    """The same synthetic store written in the layout before units (no condition, unit, unit_kind, de_base)."""
    root = tmp_path_factory.mktemp("legacy")
    for i, (name, (n_layers, n_heads, n_tokens)) in enumerate(MODELS.items()):
        make_model(root / name, n_layers, n_heads, n_tokens, seed=i, legacy=True)
    return root


@pytest.fixture(scope="session")
def store(store_root):
    from selfrepair.queries.store import Store

    with Store.open(store_root) as s:
        yield s


def digest_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under root, to prove a query changed nothing on disk."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def cli():
    """The `selfrepair` click group with every command registered."""
    from selfrepair.cli import main

    return main


@pytest.fixture(scope="session")
def spec():
    """The synthetic store's shape: models (name -> layers, heads, tokens) and top_p."""
    import types

    return types.SimpleNamespace(models=MODELS, top_p=TOP_P, digest_tree=digest_tree)
