"""The authors' statistics (paper_*.sql and the rank-based neuron queries) against a numpy
recomputation from the raw values written into a hand-built store, never from the views.

The store has DE = 0 tokens inside a head's top set (with x > 0, x < 0 and 0/0), negative
self-repair, ties in DE and sr_mlps, and sr_mlps-selected tokens outside the DE-top set.
Tolerance: 1e-12 relative (float32 values, double arithmetic, only the summation order differs).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfrepair.errors import QueryError
from selfrepair.store.model_store import ModelStore
from selfrepair.store.schema import METRIC_COLUMNS, TABLES, validate_table, without_metrics
from selfrepair.store.writer import commit_shard, write_manifest

L, H, N, SEQ, BATCH, D_MLP, K, P = 3, 2, 50, 5, 2, 6, 2, 0.1
NTOP = int(np.floor(P * N))
SR_HEADS = [(1, 0), (1, 1)]  # heads whose top-sr_mlps tokens have neuron rows (the penultimate layer)


def f32(x):
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def top_by(values: np.ndarray) -> list[int]:
    """floor(P * N) token indices, largest value first, ties to the lower index."""
    return sorted(range(N), key=lambda i: (-values[i], i))[:NTOP]


@pytest.fixture(scope="module")
def raw():
    rng = np.random.default_rng(7)
    de = f32(np.round(rng.normal(size=(L, H, N)), 1))
    # Head L1H0: mostly negative DE, so DE = 0 tokens fall into its top set.
    de[1, 0] = f32(-np.abs(rng.normal(size=N)) - 0.1)
    de[1, 0, [3, 9]] = [0.5, 0.5]  # a tie
    de[1, 0, [4, 10, 20]] = 0.0
    mlp_de = f32(rng.normal(size=(L, N)))
    d_logit = f32(rng.normal(0, 0.5, (L, H, N)))
    de_abl = f32(de * rng.uniform(-0.2, 0.3, (L, H, N)))
    d_heads = f32(rng.normal(0, 0.3, (L, H, N)))
    d_mlps = f32(np.round(rng.normal(0.1, 0.4, (L, H, N)), 1))  # rounded: ties in sr_mlps
    d_heads[1, 0, 4], d_mlps[1, 0, 10] = 0.0, -0.3  # 0/0 share; a negative MLP term on DE = 0
    scale = f32(rng.uniform(0.5, 2.0, N))
    abl_scale = f32(scale / rng.uniform(0.8, 1.3, (L, H, N)))
    change = f32(np.round(rng.normal(0.0, 0.2, (L, H, N, D_MLP)), 2))  # ties among neurons
    clean = f32(rng.normal(-0.1, 0.3, (L, H, N, D_MLP)))
    change = f32(clean + change) - clean  # what de_ablated - de_clean reads back from float32
    return dict(de=de, mlp_de=mlp_de, d_logit=d_logit, de_abl=de_abl, d_heads=d_heads, d_mlps=d_mlps,
                scale=scale, abl_scale=abl_scale, change=change, clean=clean)


def neuron_tokens(r, l, h) -> list[int]:
    tokens = set(top_by(r["de"][l, h]))
    if (l, h) in SR_HEADS:
        tokens |= set(top_by(r["d_mlps"][l, h]))
    return sorted(tokens)


def ranks(change: np.ndarray) -> np.ndarray:
    """1-based rank of each neuron's change, largest first, ties to the lower index."""
    order = sorted(range(D_MLP), key=lambda n: (-change[n], n))
    out = np.empty(D_MLP, dtype=int)
    out[order] = np.arange(1, D_MLP + 1)
    return out


def _tab(name, cols):
    names = without_metrics(name) if name in METRIC_COLUMNS else TABLES[name].column_names  # no output metrics
    return validate_table(TABLES[name], pa.table(cols).select(list(names)))


@pytest.fixture(scope="module")
def paper_store(tmp_path_factory, raw):
    from selfrepair.queries.store import Store

    r = raw
    root = tmp_path_factory.mktemp("paper")
    ms = ModelStore(root / "m")
    ms.path.mkdir(parents=True)
    write_manifest(ms, {"model": {"name": "m", "n_layers": L, "n_heads": H, "d_model": 8, "d_mlp": D_MLP},
                       "n_tokens": N, "config": {"top_p": P, "batch_size": BATCH, "neurons_top_k": K},
                       "shards": {}})
    t = np.arange(N)
    logit = np.full(N, 2.0)
    tokens = {"token_index": t, "row": t // SEQ, "pos": t % SEQ, "token_id": t, "next_token_id": t,
              "token_str": [str(i) for i in t], "next_token_str": [str(i) for i in t], "logit": logit,
              "ln_scale": r["scale"], "unembed_bias": np.zeros(N), "loss": np.zeros(N), "de_other": np.zeros(N)}
    gl, gh, gt = np.meshgrid(range(L), range(H), t, indexing="ij")
    heads = {"layer": gl.ravel(), "head": gh.ravel(), "token_index": gt.ravel(), "de": r["de"].ravel()}
    ml, mt = np.meshgrid(range(L), t, indexing="ij")
    mlps = {"layer": ml.ravel(), "token_index": mt.ravel(), "de": r["mlp_de"].ravel()}
    entries = ms.write_shard_files("clean-0000", {"tokens": _tab("tokens", tokens),
                                                  "head_effects": _tab("head_effects", heads),
                                                  "mlp_effects": _tab("mlp_effects", mlps)})
    commit_shard(ms, "clean-0000", {"phase": "clean", "rows": [0, N // SEQ], "files": entries})
    ab = {"ablation": ["resample"] * (L * H * N), "sample": np.zeros(L * H * N), "layer": gl.ravel(),
          "head": gh.ravel(), "token_index": gt.ravel(), "d_logit": r["d_logit"].ravel(),
          "ln_scale": r["abl_scale"].ravel(), "de": r["de_abl"].ravel(), "d_de_heads": r["d_heads"].ravel(),
          "d_de_mlps": r["d_mlps"].ravel(), "condition": [""] * (L * H * N),
          "unit": [f"L{a}H{b}" for a, b in zip(gl.ravel(), gh.ravel())], "unit_kind": ["head"] * (L * H * N),
          "de_base": r["de"].ravel()}
    neu = {k: [] for k in TABLES["neuron_effects"].column_names}
    tot = {k: [] for k in TABLES["neuron_totals"].column_names}
    for l in range(L):
        for h in range(H):
            for i in neuron_tokens(r, l, h):
                c = r["change"][l, h, i]
                rk = ranks(c)
                key = {"ablation": "resample", "sample": 0, "layer": l, "head": h, "token_index": i,
                       "condition": "", "unit": f"L{l}H{h}", "unit_kind": "head"}
                for n in range(D_MLP):
                    if rk[n] <= K or rk[n] > D_MLP - K:
                        for col, v in key.items():
                            neu[col].append(v)
                        neu["neuron"].append(n)
                        neu["rank"].append(int(rk[n]))
                        neu["de_clean"].append(r["clean"][l, h, i, n])
                        neu["de_ablated"].append(r["clean"][l, h, i, n] + c[n])
                for col, v in key.items():
                    tot[col].append(v)
                tot["d_de_sum"].append(c.sum())
                tot["d_de_abs_sum"].append(np.abs(c).sum())
                tot["d_de_pos_sum"].append(np.maximum(c, 0).sum())
    entries = ms.write_shard_files("ablation-0000", {"ablation_effects": _tab("ablation_effects", ab),
                                                     "neuron_effects": _tab("neuron_effects", neu),
                                                     "neuron_totals": _tab("neuron_totals", tot)})
    commit_shard(ms, "ablation-0000", {"phase": "ablation", "rows": [0, N // SEQ], "files": entries})
    with Store.open(root) as s:
        yield s


def parts(r, l, h):
    """Per token of head (l, h): de, sr, sr_heads, sr_mlps, sr_ln (from the raw values)."""
    de = r["de"][l, h]
    sr = r["d_logit"][l, h] - (r["de_abl"][l, h] - de)
    return de, sr, r["d_heads"][l, h], r["d_mlps"][l, h], sr - r["d_heads"][l, h] - r["d_mlps"][l, h]


def clipped_mean(x, de):
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.clip(x / de, 0, 1)
    return np.nanmean(v) if np.any(~np.isnan(v)) else None


def close(got, want):
    if want is None or (isinstance(want, float) and np.isnan(want)):
        return got is None or np.isnan(got)
    return np.isclose(got, want, rtol=1e-12, atol=1e-15)


def test_paper_shares(paper_store, raw):
    df = paper_store.query("paper_shares", p=P)
    for l in range(L):
        per_head = []
        for h in range(H):
            de, sr, heads, mlps, ln = parts(raw, l, h)
            top = top_by(de)
            want = {c: clipped_mean(x[top], de[top]) for c, x in
                    (("heads_share", heads), ("mlps_share", mlps), ("ln_share", ln), ("sr_share", sr))}
            per_head.append(want)
            row = df.filter((df["layer"] == l) & (df["head"] == h)).row(0, named=True)
            assert row["n_tokens"] == NTOP
            for c, w in want.items():
                assert close(row[c], w), (l, h, c, row[c], w)
        row = df.filter((df["layer"] == l) & df["head"].is_null()).row(0, named=True)
        for c in per_head[0]:
            vals = [w[c] for w in per_head]
            assert close(row[c], None if None in vals else float(np.mean(vals)))


def test_de_zero_tokens_are_in_the_top_set(raw):
    top = top_by(raw["de"][1, 0])
    assert {4, 10, 20} <= set(top), "the fixture must put DE = 0 tokens in L1H0's top set"


def test_paper_final_mlp_share(paper_store, raw):
    df = paper_store.query("paper_final_mlp_share", p=P)
    assert sorted(df["layer"].unique()) == [L - 2]
    for h in range(H):
        de, sr, _, mlps, _ = parts(raw, L - 2, h)
        top = [i for i in top_by(de) if sr[i] > 0]
        want = np.mean(np.clip(np.maximum(mlps[top], 0) / sr[top], 0, 1))
        row = df.filter(df["head"] == h).row(0, named=True)
        assert row["n_tokens"] == len(top) and close(row["mlps_share"], want)


def test_paper_top_neurons_share(paper_store, raw):
    df = paper_store.query("paper_top_neurons_share", top_n=2)
    for h in range(H):
        mlps = raw["d_mlps"][L - 2, h]
        sel = top_by(mlps)
        assert set(sel) - set(top_by(raw["de"][L - 2, h])), "some selected tokens are outside the DE top set"
        vals = []
        for i in sel:
            c = raw["change"][L - 2, h, i]
            top2 = c[ranks(c) <= 2].sum()
            vals.append(min(top2 / mlps[i], 3.0))
        row = df.filter(df["head"] == h).row(0, named=True)
        assert row["n_tokens"] == NTOP and close(row["top_share"], float(np.mean(vals)))


def test_paper_anti_erasure_top_neuron(paper_store, raw):
    df = paper_store.query("paper_anti_erasure_top_neuron", layer=1, head=1)
    sel = sorted(top_by(raw["d_mlps"][1, 1]))
    assert df["token_index"].to_list() == sel
    for row in df.iter_rows(named=True):
        i = row["token_index"]
        c = raw["change"][1, 1, i]
        n = int(np.flatnonzero(ranks(c) == 1)[0])
        assert row["neuron"] == n and close(row["de_clean"], raw["clean"][1, 1, i, n])
        assert close(row["final_mlp_de"], raw["mlp_de"][L - 1, i])


def test_paper_neuron_top_frequency(paper_store, raw):
    df = paper_store.query("paper_neuron_top_frequency", layer=1, head=0, top_n=2, limit=100)
    sel = top_by(raw["d_mlps"][1, 0])
    counts = np.zeros(D_MLP, dtype=int)
    for i in sel:
        counts[ranks(raw["change"][1, 0, i]) <= 2] += 1
    want = sorted(((n, c) for n, c in enumerate(counts) if c), key=lambda x: (-x[1], x[0]))
    assert list(zip(df["neuron"], df["n_top"])) == want
    assert df["frequency"].to_list() == [c / NTOP for _, c in want]


def test_sr_mlps_queries_refuse_without_neuron_rows(paper_store):
    with pytest.raises(QueryError, match=r"L2H0: its top tokens by sr_mlps have no neuron rows; ingest them with "
                                         r"`selfrepair ingest --sr-mlps-neurons L2H0`"):
        paper_store.query("paper_anti_erasure_top_neuron", layer=2, head=0)


def test_neuron_sparsity_and_cumulative_rank_by_sign(paper_store, raw):
    l, h = 2, 1
    top = top_by(raw["de"][l, h])
    sp = paper_store.query("fig_neuron_sparsity", layer=l, head=h, p=P, max_rank=2)
    cu = paper_store.query("fig_neuron_cumulative", layer=l, head=h, p=P, max_rank=2)
    for n_rank in (1, 2):
        nth = [np.sort(raw["change"][l, h, i])[::-1][n_rank - 1] for i in top]
        for x in (50.0, 10.0, 1.0):
            want = sum(v > x / 100 * raw["de"][l, h, i] for v, i in zip(nth, top)) / NTOP
            got = sp.filter((sp["n_rank"] == n_rank) & (sp["threshold_pct"] == x))["share"][0]
            assert close(got, want)
        want = np.mean([np.sort(raw["change"][l, h, i])[::-1][:n_rank].sum() / f32(np.abs(raw["change"][l, h, i]).sum())
                        for i in top])
        assert close(cu.filter(cu["n_rank"] == n_rank)["cumulative_share"][0], want)


def test_paper_ln_ratio_distribution(paper_store, raw):
    l, h = 0, 1
    de = raw["de"][l, h]
    ratio = raw["scale"] / raw["abl_scale"][l, h]
    keep = de > np.percentile(de, 98)
    df = paper_store.query("paper_ln_ratio_distribution", layer=l, head=h, bin_width=0.01)
    assert df["n_tokens"].sum() == keep.sum()
    assert close(df["share_above_1"][0], float(np.mean(ratio[keep] > 1)))


def test_paper_head_means_and_layer_trend(paper_store, raw):
    heads = paper_store.query("paper_head_de_vs_dlogit")
    trend = paper_store.query("paper_layer_trend")
    batch = (np.arange(N) // SEQ) // BATCH
    for l in range(L):
        fractions = []
        for h in range(H):
            de, dl = raw["de"][l, h], raw["d_logit"][l, h]
            means = [(de[m].mean(), dl[m].mean()) for b in np.unique(batch)
                     for m in [(batch == b) & (np.abs(de) > 0)] if m.any()]
            mde, mdl = np.mean([m[0] for m in means]), np.mean([m[1] for m in means])
            row = heads.filter((heads["layer"] == l) & (heads["head"] == h)).row(0, named=True)
            assert close(row["de_clean"], mde) and close(row["d_logit"], mdl)
            fractions.append(np.clip((mdl + mde) / mde, 0, 1))
        assert close(trend.filter(trend["layer"] == l)["repair_fraction"][0], float(np.mean(fractions)))


def test_old_store_refuses_rank_queries_and_opens(tmp_path, paper_store):
    """A store whose neuron_effects predates `rank`: views open, rank queries refuse with one line."""
    import shutil

    from selfrepair.queries.store import Store

    root = tmp_path / "old"
    shutil.copytree(paper_store.root, root)
    for f in (root / "m").rglob("*.parquet"):
        if "neuron_effects" in str(f):
            pq.write_table(pq.read_table(f).drop(["rank"]), f)
    with Store.open(root) as s:
        assert s.query("paper_shares", p=P).height > 0
        with pytest.raises(QueryError, match="needs final-MLP neuron ranks by signed change in DE .* the store of m "
                                             "predates"):
            s.query("fig_neuron_sparsity", layer=0, head=0, p=P)
