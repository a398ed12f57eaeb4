"""The synthetic store of conftest.py with units and conditions added (issue 20).

`add_units` commits, beside the head-only rows `make_model` wrote (every head, each ablation),
two ablation shards of the same zero-ablation draw: unconditioned units of the other kinds (a
named group, ATTN, MLP, BLOCK) and units under the condition L0H1, with the condition run's
`condition_tokens`. The
numbers satisfy DESIGN.md's identities by the conftest's construction (pick X = logit_abl - b_U
and r = ln_ratio against the baseline, then d_de_mlps closes the decomposition), with the
baseline the clean run for unconditioned rows and the L0H1-ablated run for conditioned ones;
the condition run is L0H1's own unconditioned ablation, so condition_tokens equals it.
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa

from selfrepair.store.labels import Unit, parse_units, units_spec
from selfrepair.store.model_store import ModelStore
from selfrepair.store.schema import TABLES
from selfrepair.store.writer import commit_shard

ABLATION = "zero"
UNITS = "backup=L1H1+L1H2,ATTN1,MLP0,BLOCK1"
CONDITION = "L0H1"
CONDITIONED = "L1H0,L1H2,backup=L1H1+L1H2,MLP1"


def _clean(ms: ModelStore) -> dict:
    """The clean run's arrays: logit, b_U, scale per token; head DE [layer, head, token]; MLP DE [layer, token]."""
    t = ms.read_table("tokens").sort_by("token_index")
    h = ms.read_table("head_effects").sort_by([("layer", "ascending"), ("head", "ascending"),
                                               ("token_index", "ascending")])
    m = ms.read_table("mlp_effects").sort_by([("layer", "ascending"), ("token_index", "ascending")])
    man = ms.manifest()
    n, L, H = man.n_tokens, man.model.n_layers, man.model.n_heads
    return {"logit": t["logit"].to_numpy().astype(np.float64), "bias": t["unembed_bias"].to_numpy().astype(np.float64),
            "scale": t["ln_scale"].to_numpy().astype(np.float64),
            "head": h["de"].to_numpy().astype(np.float64).reshape(L, H, n),
            "mlp": m["de"].to_numpy().astype(np.float64).reshape(L, n), "n": n, "L": L, "H": H}


def unit_de(c: dict, unit: Unit) -> np.ndarray:
    """A unit's clean DE per token: the sum of its components'."""
    out = np.zeros(c["n"])
    for la, h in unit.heads(c["H"]):
        out += c["head"][la, h]
    for la in unit.mlps():
        out += c["mlp"][la]
    return out


def _rows(rng, unit: Unit, cond: str, logit: np.ndarray, scale: np.ndarray, bias: np.ndarray,
          de_base: np.ndarray) -> dict:
    """One unit's ablation rows against a baseline run (logit, final-norm scale, the unit's DE in it)."""
    n = len(logit)
    x = logit - bias + rng.normal(0, 0.5, n)  # logit_abl - b_U
    r = rng.uniform(0.8, 1.3, n)  # ln_ratio = s_base / s_abl
    d_logit = x + bias - logit
    de_abl = de_base * rng.uniform(-0.2, 0.3, n)
    d_heads = rng.normal(0, 0.3, n)
    sr_ln = (r - 1) * x / r
    d_mlps = d_logit - (de_abl - de_base) - d_heads - sr_ln
    return {"ablation": [ABLATION] * n, "sample": [0] * n, "condition": [cond] * n, "unit": [unit.label] * n,
            "unit_kind": [unit.kind] * n, "layer": [unit.layer] * n, "head": [unit.head] * n,
            "token_index": np.arange(n), "d_logit": d_logit, "ln_scale": scale / r, "de": de_abl,
            "de_base": de_base, "d_de_heads": d_heads, "d_de_mlps": d_mlps,
            **metrics(n, zlib.crc32(f"{cond}|{unit.label}".encode()))}


def metrics(n: int, seed: int) -> dict:
    """Synthetic output metrics of n rows (kl >= 0), from their own generator so the other columns keep theirs."""
    g = np.random.default_rng(1000 + seed)
    return {"d_loss": g.normal(0.1, 0.3, n), "kl": np.abs(g.normal(0, 0.2, n)), "d_entropy": g.normal(0, 0.2, n),
            "top1_changed": g.random(n) < 0.2}


def _concat(parts: list[dict]) -> pa.Table:
    cols = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
    return pa.table(cols).select(TABLES["ablation_effects"].column_names).cast(TABLES["ablation_effects"].arrow_schema)


def add_units(ms: ModelStore, seed: int = 7) -> dict:
    """Commit the two shards; returns the raw numbers: {(condition, unit label): ablation rows}, and the
    condition run's logit and scale."""
    rng = np.random.default_rng(seed)
    c = _clean(ms)
    n, n_layers, n_heads = c["n"], c["L"], c["H"]
    man = ms.manifest()
    n_rows = man.n_tokens // (man.seq_len - 1) if man.seq_len else max(e.rows[1] for e in man.shards.values())
    out = {}
    units = parse_units(UNITS, n_layers, n_heads)
    alone = [_rows(rng, u, "", c["logit"], c["scale"], c["bias"], unit_de(c, u)) for u in units]
    out.update({("", u.label): a for u, a in zip(units, alone)})
    heads = ms.read_table("ablation_effects").to_pandas()  # make_model's head rows (float32, as stored)
    heads = heads[heads["ablation"] == ABLATION].sort_values("token_index")
    for (la, h), rows in heads.groupby(["layer", "head"]):
        out[("", f"L{la}H{h}")] = {k: rows[k].to_numpy() for k in ("d_logit", "ln_scale", "d_loss", "kl", "d_entropy",
                                                                  "top1_changed")}
    files = ms.write_shard_files("abl-units", {"ablation_effects": _concat(alone)})
    commit_shard(ms, "abl-units", {"phase": "ablation", "rows": [0, n_rows], "ablation": ABLATION, "sample": 0,
                                   "units": units_spec(units), "condition": "", "files": files})
    # The condition run is L0H1 ablated alone: its logit and final-norm scale.
    base = out[("", CONDITION)]
    logit_c, scale_c = c["logit"] + base["d_logit"], base["ln_scale"]
    cond_units = parse_units(CONDITIONED, n_layers, n_heads)
    given = []
    for u in cond_units:
        de_c = unit_de(c, u) + rng.normal(0, 0.2, n)  # the unit's DE in the condition run
        given.append(_rows(rng, u, CONDITION, logit_c, scale_c, c["bias"], de_c))
    out.update({(CONDITION, u.label): g for u, g in zip(cond_units, given)})
    cond_tokens = pa.table({"ablation": [ABLATION] * n, "sample": [0] * n, "condition": [CONDITION] * n,
                            "token_index": np.arange(n), "logit": logit_c, "ln_scale": scale_c,
                            "loss": np.abs(logit_c), "entropy": scale_c}
                           ).cast(TABLES["condition_tokens"].arrow_schema)
    files = ms.write_shard_files("abl-cond", {"ablation_effects": _concat(given), "condition_tokens": cond_tokens})
    commit_shard(ms, "abl-cond", {"phase": "ablation", "rows": [0, n_rows], "ablation": ABLATION, "sample": 0,
                                  "units": units_spec(cond_units), "condition": CONDITION, "files": files})
    out["condition_run"] = {"logit": logit_c, "ln_scale": scale_c}
    out["clean"] = c
    return out
