"""The store keyed by unit and condition (issue 20): shard entries, the plan, verify and compaction.

The plan's tests fold its work into hand-made manifests (no model); verify and compaction run
on a small hand-built store whose numbers satisfy DESIGN.md's identities (the queries'
conftest construction: X = logit_abl - b_U and r = ln_ratio against the baseline run, then
d_de_mlps closes the decomposition), with one shard of each layout: before units (head rows
without condition, unit, unit_kind, de_base) and after.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from selfrepair.errors import StoreError
from selfrepair.queries.store import Store
from selfrepair.store import files
from selfrepair.store.compact import compact
from selfrepair.store.compacted_files import without_shards
from selfrepair.store.labels import parse_units
from selfrepair.store.manifest import parse_manifest
from selfrepair.store.model_store import ModelStore
from selfrepair.store.plan import ablation_work, batches, stored_heads
from selfrepair.store.schema import LEGACY_COLUMNS, METRIC_COLUMNS, SCHEMA_VERSION, TABLES, validate_table, without_metrics
from selfrepair.store.writer import commit_shard, write_manifest

L, H, SEQ, ROWS, BATCH = 2, 2, 5, 4, 2
PREDS = SEQ - 1
N = ROWS * PREDS


# -- the plan, on hand-made manifests ---------------------------------------------------------
def _manifest(tmp_path, shards: dict, n_rows: int = ROWS):
    return parse_manifest(tmp_path, {
        "schema_version": 2, "model": {"n_layers": L, "n_heads": H}, "n_tokens": n_rows * PREDS, "n_rows": n_rows,
        "seq_len": SEQ, "config": {"batch_size": BATCH, "ablations": ["resample", "zero"]},
        "resample": {"samples": 1, "batch_size": BATCH}, "ablations": ["resample", "zero"], "shards": shards}, "test")


def _fold(shards: dict, work) -> dict:
    """The shards after each work item's commit (held tables marked as compacted: no file needed)."""
    out = dict(shards)
    for w in work:
        for sid in w.supersedes:
            out.pop(sid, None)
        held = ["resample_sources"] * w.with_sources + ["condition_tokens"] * w.with_condition_tokens
        out[w.shard_id] = {"phase": "ablation", "rows": list(w.rows), "ablation": w.kind, "sample": w.sample,
                           "files": {}, "compacted": held, **w.entry_fields()}
    return out


def _run(tmp_path, shards, units: str, condition: str | None = None, n_rows: int = ROWS, draws=(("resample", 0),),
         top=None):
    m = _manifest(tmp_path, shards, n_rows)
    cond = parse_units(condition, L, H)[0] if condition else None
    work = ablation_work(m, n_rows, BATCH, list(draws), parse_units(units, L, H), lambda s, r0, r1: "pairs", top,
                         condition=cond)
    return work, _fold(shards, work)


def _keys(tmp_path, shards) -> list[tuple]:
    """Every (draw, condition, unit, batch) the shards hold, once per shard that holds it."""
    m = _manifest(tmp_path, shards)
    return sorted((*e.draw, e.condition_label(L, H), u.label, e.rows) for e in m.shards.values()
                  for u in e.unit_list(L, H))


def test_adding_units_equals_one_run(tmp_path):
    first, shards = _run(tmp_path, {}, "L1H0,MLP0")
    assert [w.units_spec for w in first] == ["MLP0,L1H0"] * 2 and all(w.with_sources for w in first)
    more, shards = _run(tmp_path, shards, "L1H0,MLP0,ATTN1,backup=L0H0+L1H1")
    assert [w.units_spec for w in more] == ["backup=L0H0+L1H1,ATTN1"] * 2
    assert not any(w.supersedes or w.with_sources for w in more)
    _, once = _run(tmp_path, {}, "L1H0,MLP0,ATTN1,backup=L0H0+L1H1")
    got = _keys(tmp_path, shards)
    assert got == _keys(tmp_path, once) and len(got) == len(set(got)) == 4 * len(batches(ROWS, BATCH))
    assert _run(tmp_path, shards, "ATTN1,MLP0")[0] == []


def test_conditions_extend_the_store_side_by_side(tmp_path):
    _, shards = _run(tmp_path, {}, "L0H1,L1H0,MLP1")
    # L0H1 itself shares its head with the condition: nothing to ablate on top of it.
    work, shards = _run(tmp_path, shards, "L0H1,L1H0,MLP1", condition="L0H1")
    assert [(w.units_spec, w.condition_spec) for w in work] == [("MLP1,L1H0", "L0H1")] * 2
    assert all(w.with_condition_tokens and not w.with_sources and not w.supersedes for w in work)
    work, shards = _run(tmp_path, shards, "L1H0,MLP1", condition="pair=L0H0+L0H1")
    assert [(w.units_spec, w.condition_spec) for w in work] == [("MLP1,L1H0", "pair=L0H0+L0H1")] * 2
    assert all(_run(tmp_path, shards, "L1H0,MLP1", condition=c)[0] == [] for c in ("L0H1", "pair=L0H0+L0H1"))
    got = _keys(tmp_path, shards)
    assert len(got) == len(set(got)) == (3 + 2 + 2) * 2
    m = _manifest(tmp_path, shards)
    # The per-head neuron phase reads the unconditioned head units only.
    assert set().union(*(stored_heads(m, e) for e in m.shards.values())) == {(0, 1), (1, 0)}


def test_a_grown_batch_redoes_every_condition_and_moves_what_it_holds(tmp_path):
    _, shards = _run(tmp_path, {}, "L1H0,ATTN1", n_rows=3)
    _, shards = _run(tmp_path, shards, "MLP1", condition="L0H1", n_rows=3)
    work, shards = _run(tmp_path, shards, "L1H1", condition="L0H1", n_rows=4)
    last = [w for w in work if w.rows == (2, 4)]
    assert [(w.condition_spec, w.units_spec, len(w.supersedes), w.with_sources, w.with_condition_tokens)
            for w in last] == [("", "ATTN1,L1H0", 1, True, False), ("L0H1", "MLP1,L1H1", 1, False, True)]
    assert [w.units_spec for w in work if w.rows == (0, 2)] == ["L1H1"]  # the full batch only gains L1H1
    got = _keys(tmp_path, shards)
    assert len(got) == len(set(got)) and {k[-1] for k in got} == {(0, 2), (2, 4)}


def test_changed_top_sets_redo_only_the_units_they_concern(tmp_path):
    same = lambda r0, r1, units: "old"  # noqa: E731
    _, shards = _run(tmp_path, {}, "L1H0", draws=(("zero", 0),), top=same)
    _, shards = _run(tmp_path, shards, "MLP1", condition="L0H1", draws=(("zero", 0),), top=same)
    for e in shards.values():
        e["top_sha"] = "old"
    moved = lambda r0, r1, units: "new" if any(u.label == "MLP1" for u in units) else "old"  # noqa: E731
    work, _ = _run(tmp_path, shards, "L1H0", draws=(("zero", 0),), top=moved)
    assert [(w.condition_spec, w.units_spec, len(w.supersedes)) for w in work] == [("L0H1", "MLP1", 1)] * 2


def test_entries_written_before_units_hold_head_units(tmp_path):
    old = {f"abl-{r0}": {"phase": "ablation", "rows": [r0, r1], "ablation": "resample", "sample": 0, "heads": "L1",
                         "files": {}, "compacted": ["resample_sources"]} for r0, r1 in batches(ROWS, BATCH)}
    assert _run(tmp_path, old, "L1H0,L1H1")[0] == []
    work, _ = _run(tmp_path, old, "L1H1,ATTN0")
    assert [w.units_spec for w in work] == ["ATTN0"] * 2 and not any(w.with_sources for w in work)


@pytest.mark.parametrize("entry,message", [
    ({"units": "L1H0,MLP7"}, "do not fit the model"),
    ({"units": "L1H0", "condition": "L0H1,L0H0"}, "condition .L0H1,L0H0. does not fit .* names 2 units, not one"),
    ({"units": "ATTN1", "condition": "L1H0"}, "unit ATTN1 shares a component with its condition L1H0"),
    ({"units": "L1H0", "condition": 3}, "has the wrong type"),
])
def test_a_shard_naming_impossible_units_is_refused(tmp_path, entry, message):
    shard = {"phase": "ablation", "rows": [0, 2], "ablation": "zero", "sample": 0, "files": {}} | entry
    with pytest.raises(StoreError, match=message):
        _manifest(tmp_path, {"abl": shard})


# -- verify and compaction, on a hand-built store ---------------------------------------------
def _cast(name: str, cols: dict) -> pa.Table:
    names = without_metrics(name) if name in METRIC_COLUMNS else TABLES[name].column_names  # no output metrics
    return validate_table(TABLES[name], pa.table({c: cols[c] for c in names}))


def _effects(rng, unit, cond: str, logit, scale, bias, de_base, tokens) -> dict:
    n = len(tokens)
    x = logit - bias + rng.normal(0, 0.5, n)
    r = rng.uniform(0.8, 1.3, n)
    d_logit = x + bias - logit
    de_abl = de_base * rng.uniform(-0.2, 0.3, n)
    d_heads = rng.normal(0, 0.3, n)
    d_mlps = d_logit - (de_abl - de_base) - d_heads - (r - 1) * x / r
    return {"ablation": ["zero"] * n, "sample": [0] * n, "condition": [cond] * n, "unit": [unit.label] * n,
            "unit_kind": [unit.kind] * n, "layer": [unit.layer] * n, "head": [unit.head] * n, "token_index": tokens,
            "d_logit": d_logit, "ln_scale": scale / r, "de": de_abl, "de_base": de_base, "d_de_heads": d_heads,
            "d_de_mlps": d_mlps}


def _stack(parts: list[dict]) -> dict:
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}


def _write(ms: ModelStore, sid: str, entry: dict, tables: dict) -> None:
    """Write a shard's files as given (the layout before units too) and commit its entry."""
    entries = {}
    for name, table in tables.items():
        path = ms.shard_file(name, sid)
        size, digest = files.write_parquet(path, table)
        entries[name] = {"path": str(path.relative_to(ms.path)), "rows": table.num_rows, "bytes": size,
                         "sha256": digest}
    commit_shard(ms, sid, entry | {"files": entries})


def build(path, seed: int = 0, damage=None) -> ModelStore:
    """One batch of ROWS rows: a clean shard; L1H1 and L1H0 ablated in the layout before units; MLP0 and
    backup=L0H0+L1H1 after it; L1H0 and MLP1 under the condition L0H1, with its condition run."""
    rng = np.random.default_rng(seed)
    ms = ModelStore(path)
    path.mkdir(parents=True)
    write_manifest(ms, {"model": {"name": path.name, "n_layers": L, "n_heads": H}, "n_tokens": N, "n_rows": ROWS,
                        "seq_len": SEQ, "ablations": ["zero"], "shards": {},
                        "config": {"batch_size": ROWS, "top_p": 0.25, "ablations": ["zero"]}})
    t = np.arange(N)
    head_de, mlp_de = rng.normal(size=(L, H, N)), rng.normal(size=(L, N))
    logit, bias, scale = rng.normal(2, 1, N), rng.normal(0, 0.1, N), rng.uniform(0.5, 2, N)
    tokens = {"token_index": t, "row": t // PREDS, "pos": t % PREDS, "token_id": t, "next_token_id": t + 1,
              "token_str": [str(i) for i in t], "next_token_str": [str(i + 1) for i in t], "logit": logit,
              "ln_scale": scale, "unembed_bias": bias, "loss": np.ones(N),
              "de_other": logit - bias - head_de.sum((0, 1)) - mlp_de.sum(0)}
    gl, gh, gt = np.meshgrid(range(L), range(H), t, indexing="ij")
    ml, mt = np.meshgrid(range(L), t, indexing="ij")
    _write(ms, "clean", {"phase": "clean", "rows": [0, ROWS], "tokens": [0, N]}, {
        "tokens": _cast("tokens", tokens),
        "head_effects": _cast("head_effects", {"layer": gl.ravel(), "head": gh.ravel(), "token_index": gt.ravel(),
                                               "de": head_de.ravel()}),
        "mlp_effects": _cast("mlp_effects", {"layer": ml.ravel(), "token_index": mt.ravel(), "de": mlp_de.ravel()})})

    def de_of(u):
        return sum((head_de[la, h] for la, h in u.heads(H)), np.zeros(N)) + sum((mlp_de[la] for la in u.mlps()),
                                                                               np.zeros(N))

    old_units = parse_units("L1H0,L1H1", L, H)
    old = _cast("ablation_effects", _stack([_effects(rng, u, "", logit, scale, bias, de_of(u), t) for u in old_units]))
    _write(ms, "abl-old", {"phase": "ablation", "rows": [0, ROWS], "ablation": "zero", "sample": 0, "heads": "L1"},
           {"ablation_effects": old.select(list(LEGACY_COLUMNS["ablation_effects"][0]))})
    new_units = parse_units("MLP0,backup=L0H0+L1H1,L0H1", L, H)
    alone = [_effects(rng, u, "", logit, scale, bias, de_of(u), t) for u in new_units]
    _write(ms, "abl-new", {"phase": "ablation", "rows": [0, ROWS], "ablation": "zero", "sample": 0,
                           "units": "MLP0,backup=L0H0+L1H1,L0H1", "condition": ""},
           {"ablation_effects": _cast("ablation_effects", _stack(alone))})
    base = alone[2]  # the condition run: L0H1 ablated alone
    logit_c, scale_c = logit + base["d_logit"], base["ln_scale"]
    given_units = parse_units("L1H0,MLP1", L, H)
    given = [_effects(rng, u, "L0H1", logit_c, scale_c, bias, de_of(u) + rng.normal(0, 0.2, N), t)
             for u in given_units]
    tables = {"ablation_effects": _cast("ablation_effects", _stack(given)),
              "condition_tokens": _cast("condition_tokens", {"ablation": ["zero"] * N, "sample": [0] * N,
                                                             "condition": ["L0H1"] * N, "token_index": t,
                                                             "logit": logit_c, "ln_scale": scale_c})}
    entry = {"phase": "ablation", "rows": [0, ROWS], "ablation": "zero", "sample": 0, "units": "L1H0,MLP1",
             "condition": "L0H1"}
    if damage:
        entry, tables = damage(entry, tables)
    _write(ms, "abl-cond", entry, tables)
    return ms


def _problems(ms) -> list[str]:
    from selfrepair.store.verify import verify

    report = verify(ms.path.parent)
    return report.problems[ms.name], report.checked[ms.name]


def test_verify_checks_units_and_conditions(tmp_path):
    bad, ok = _problems(build(tmp_path / "m"))
    assert bad == []
    assert "coverage: zero draw 0: 5 of 5 unit(s) on all 1 batches; zero draw 0 | L0H1: 2 of 2 unit(s) on all 1 " \
           "batches" in ok
    assert any(line.startswith("identity sr_ln") for line in ok)


@pytest.mark.parametrize("damage,problem", [
    (lambda e, t: (e, {"ablation_effects": t["ablation_effects"]}),
     "zero draw 0 | L0H1, rows 0..4: no shard holds its condition_tokens"),
    (lambda e, t: (e | {"units": "L1H0"}, t), "holds 1 (condition, unit) row kind(s) its entry does not declare (e.g. "
                                              "L0H1 / MLP1 / mlp / 1 / -1)"),
    (lambda e, t: (e | {"condition": ""}, {"ablation_effects": t["ablation_effects"]}),
     "its entry does not declare"),
    (lambda e, t: (e | {"units": "L1H0,MLP1,MLP0", "condition": ""}, {"ablation_effects": t["ablation_effects"]}),
     "shards abl-cond and abl-new overlap (zero draw 0, 1 unit(s))"),
])
def test_verify_finds_rows_outside_their_units(tmp_path, damage, problem):
    bad, _ = _problems(build(tmp_path / "m", damage=damage))
    assert any(problem in p for p in bad), bad


def test_a_wrong_unit_kind_is_found(tmp_path):
    def damage(entry, tables):
        t = tables["ablation_effects"]
        kinds = pa.array(["attn" if k == "mlp" else k for k in t["unit_kind"].to_pylist()])
        return entry, tables | {"ablation_effects": t.set_column(t.schema.get_field_index("unit_kind"), "unit_kind",
                                                                  kinds)}

    bad, _ = _problems(build(tmp_path / "m", damage=damage))
    assert any("L0H1 / MLP1 / attn / 1 / -1" in p for p in bad), bad


def _rows(root) -> dict:
    with Store.open(root) as s:
        return {t: s.sql(f"SELECT * FROM {t} ORDER BY ALL") for t in ("ablation_effects", "self_repair",
                                                                      "condition_tokens")}


def test_compaction_keeps_both_layouts_and_every_row(tmp_path):
    ms = build(tmp_path / "m")
    before = _rows(tmp_path)
    assert before["ablation_effects"].filter(before["ablation_effects"]["unit"] == "L1H1")["de_base"].null_count() == 0
    (result,) = compact(tmp_path)
    assert result.shards == 4 and len(ms.manifest().compacted["ablation_effects"]) == 2  # one file per layout
    after = _rows(tmp_path)
    assert all(after[t].equals(before[t]) for t in before)
    assert _problems(ms)[0] == []
    # An extension redoing the conditioned shard drops exactly its units' rows from the compacted files.
    man = ms.manifest()
    out = without_shards(ms, man, ["abl-cond", "abl-old"])
    kept = [files.read_parquet([ms.path / f["path"]]) for f in out["ablation_effects"]]
    pairs = {(c, u) for t in kept for c, u in zip(t["condition"].to_pylist(), t["unit"].to_pylist())}
    assert len(kept) == 1 and pairs == {("", "MLP0"), ("", "backup"), ("", "L0H1")}
    assert out["condition_tokens"] == []


# -- a store ingested before units ------------------------------------------------------------
def _same_rows(a: Store, b: Store, table: str) -> None:
    """The same rows (keys first, so float noise cannot reorder them); values equal to float32 rounding:
    an older file's de_base is head_effects.de, a newer one's the engine's own sum of the same DE."""
    from polars.testing import assert_frame_equal

    # The output metrics came after units: an older file reads them as NULL (compared apart, below).
    metrics = METRIC_COLUMNS.get(table, METRIC_COLUMNS["ablation_effects"] if table == "self_repair" else ())
    exclude = f"EXCLUDE ({', '.join(metrics)})" if metrics else ""
    q = f"SELECT * {exclude} FROM {table} ORDER BY ALL"
    assert_frame_equal(a.sql(q), b.sql(q), check_exact=False, rel_tol=1e-6, abs_tol=1e-6)


def _before_units(model_dir) -> None:
    """Rewrite an ingested store as the code before units left it: every unit table in its older layout
    (LEGACY_COLUMNS), shard entries naming their `heads`, no `units` or `condition`."""
    import json

    ms = ModelStore(model_dir)
    man = json.loads(ms.manifest_path.read_text())  # the ingest folded its commits into it
    for e in man["shards"].values():
        if e["phase"] != "clean":
            units = parse_units(e.pop("units", None) or e.get("heads", "all"), L, 4)
            e.pop("condition", None)
            e["heads"] = ",".join(u.label for u in units if u.kind == "head")
        for table, entry in e["files"].items():
            if table in LEGACY_COLUMNS:
                path = ms.path / entry["path"]
                t = files.read_parquet([path]).select(list(LEGACY_COLUMNS[table][0]))
                files.write_parquet(path, t)
                entry.update(rows=t.num_rows, bytes=path.stat().st_size, sha256=files.sha256_file(path))
    ms.manifest_path.write_text(json.dumps(man | {"schema_version": 2}))


def test_a_store_ingested_before_units_reads_verifies_and_extends(tiny_stores, tiny_model_dirs, tmp_path):
    from tiny_models import SMALL_STORE, ingest_tiny

    from selfrepair.store.verify import verify

    new = tiny_stores.copy("gpt2", tmp_path / "new", **SMALL_STORE)
    old = tiny_stores.copy("gpt2", tmp_path / "old", **SMALL_STORE)
    _before_units(old / "tiny-gpt2")
    assert verify(old).ok, verify(old).lines()
    tables = ("ablation_effects", "ablation_top", "repair_sources", "neuron_effects", "neuron_totals",
              "attention_top", "self_repair")
    with Store.open(old) as a, Store.open(new) as b:
        for t in tables:  # the views fill condition, unit, unit_kind and de_base in
            _same_rows(a, b, t)
        assert a.sql("SELECT count(kl) AS n FROM self_repair")["n"][0] == 0  # older than the output metrics
        assert b.sql("SELECT count(kl) AS n FROM self_repair")["n"][0] > 0
    # Its shards' units, draws and top-token digests are the new code's: the same run does nothing.
    assert ingest_tiny(tiny_model_dirs["gpt2"], old, **SMALL_STORE).shards_written == 0
    # More heads: new-layout shards beside the older ones, one run's keys, both layouts compacted.
    more = SMALL_STORE | {"heads": "all"}
    assert ingest_tiny(tiny_model_dirs["gpt2"], old, **more).shards_written > 0
    ingest_tiny(tiny_model_dirs["gpt2"], new, **more)
    compact(old)
    assert verify(old).ok, verify(old).lines()
    extended = ModelStore(old / "tiny-gpt2").manifest()
    assert len(extended.compacted["ablation_effects"]) == 2 and extended.schema_version == SCHEMA_VERSION == 4
    with Store.open(old) as a, Store.open(new) as b:
        for t in tables:
            _same_rows(a, b, t)


def test_sr_mlps_sets_read_head_units_without_a_condition_in_either_layout(tmp_path):
    """L1H0 has rows in the layout before units and, under the condition L0H1, in the newer one:
    its top tokens by sr_mlps are those of the head alone."""
    from selfrepair.store.top_tokens import sr_mlps_sets

    ms = build(tmp_path / "m")
    old = files.read_parquet([ms.path / ms.manifest().shards["abl-old"].files["ablation_effects"].path])
    keep = int(np.floor(0.25 * N))
    for head in (0, 1):
        rows = old.filter(pc.equal(old["head"], head))
        d = rows["d_de_mlps"].to_numpy()
        want = np.sort(rows["token_index"].to_numpy()[np.lexsort((rows["token_index"].to_numpy(), -d))[:keep]])
        got = sr_mlps_sets(ms, 0.25, "zero", 0, [(1, head)])[(1, head)]
        assert got.tolist() == want.tolist()
