"""Re-running ingest: more heads or more tokens append shards; --overwrite replaces a conflicting run."""

from tiny_models import ingest_tiny
from selfrepair import Store
from selfrepair.store.verify import verify


def _count(store, sql):
    return Store.open(store).sql(sql).row(0)[0]


def test_more_heads_then_more_tokens_append(tiny_model_dirs, tmp_path):
    d = tiny_model_dirs["gpt2"]
    first = ingest_tiny(d, tmp_path, tokens=124, heads="L0", ablations=("zero",), batch_size=2)
    assert first.shards_written == 2 + 2  # two clean batches, two ablation shards
    second = ingest_tiny(d, tmp_path, tokens=124, heads="L1H2", ablations=("zero",), batch_size=2)
    assert second.shards_skipped == 2 and second.shards_written == 2
    assert _count(tmp_path, "SELECT count(*) FROM ablation_effects") == (4 + 1) * 124
    third = ingest_tiny(d, tmp_path, tokens=248, heads="L1H2", ablations=("zero",), batch_size=2)
    # Two clean and two ablation shards for the new rows; an older shard is redone only
    # where the grown top-p% sets changed its detail (at most all 4 old ablation shards).
    assert 2 + 2 <= third.shards_written <= 2 + 2 + 4
    assert _count(tmp_path, "SELECT count(*) FROM ablation_effects") == (4 + 1) * 124 + 124
    assert _count(tmp_path, "SELECT count(*) - count(DISTINCT (ablation, sample, layer, head, token_index)) "
                            "FROM ablation_effects") == 0
    assert _count(tmp_path, "SELECT count(*) FROM tokens") == 248
    assert _count(tmp_path, "SELECT count(DISTINCT token_index) FROM ablation_effects WHERE layer = 1") == 248
    assert Store.open(tmp_path).manifest("tiny-gpt2").n_tokens == 248
    assert verify(tmp_path).ok


def test_overwrite_replaces_a_conflicting_run(tiny_model_dirs, tmp_path):
    d = tiny_model_dirs["gpt2"]
    ingest_tiny(d, tmp_path, tokens=124, ablations=("zero",))
    ingest_tiny(d, tmp_path, tokens=124, seq_len=16, ablations=("mean",), overwrite=True)  # seq_len conflicts
    kinds = Store.open(tmp_path).sql("SELECT DISTINCT ablation FROM ablation_effects")["ablation"].to_list()
    assert kinds == ["mean"]
    assert verify(tmp_path).ok


# -- extending never duplicates: the tables equal one run of the final configuration ----------

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import pytest  # noqa: E402

from selfrepair.store.schema import TABLES  # noqa: E402

SMALL = dict(seq_len=32, batch_size=2, top_p=0.05, neurons_top_k=3)


def _tables(store) -> dict[str, pl.DataFrame]:
    s = Store.open(store)
    return {name: s.sql(f"SELECT * FROM {name}").sort(list(t.key)) for name, t in TABLES.items()}


def _assert_same(got: dict, want: dict, skip=()) -> None:
    for name, spec in TABLES.items():
        key = list(spec.key)
        assert got[name].select(key).is_duplicated().sum() == 0, name
        if name in skip:
            continue
        a, b = got[name], want[name]
        assert a.height == b.height, (name, a.height, b.height)
        assert a.select(key).equals(b.select(key)), name
        for col, dtype in spec.columns:
            if col not in key:
                if dtype == pa_float:
                    assert np.allclose(a[col].to_numpy(), b[col].to_numpy(), rtol=1e-5, atol=1e-5), (name, col)
                else:
                    assert a[col].equals(b[col]), (name, col)


pa_float = TABLES["tokens"].columns[7][1]  # float32, the type of every value column


@pytest.mark.parametrize("steps,final", [
    ([dict(heads="L0"), dict(heads="L0H1"), dict(heads="all")], dict(heads="all")),
    ([dict(ablations=("resample",)), dict(ablations=("resample", "zero")), dict(ablations=("resample",), resamples=3)],
     dict(ablations=("resample", "zero"), resamples=3)),
], ids=["heads", "ablations"])
def test_extending_equals_one_run(tiny_model_dirs, tmp_path, steps, final):
    d = tiny_model_dirs["gpt2"]
    base = dict(SMALL, tokens=124, ablations=("zero",))
    written = [ingest_tiny(d, tmp_path / "grown", **(base | step)).shards_written for step in steps]
    assert all(written[i] > 0 for i in (0, 2)), written
    if steps[1].get("heads") == "L0H1":
        assert written[1] == 0  # L0H1 is already stored as part of L0
    assert ingest_tiny(d, tmp_path / "grown", **(base | steps[-1])).shards_written == 0  # nothing left to do
    ingest_tiny(d, tmp_path / "once", **(base | final))
    _assert_same(_tables(tmp_path / "grown"), _tables(tmp_path / "once"))
    assert verify(tmp_path / "grown").ok


def test_more_tokens_with_a_partial_last_batch(tiny_model_dirs, tmp_path):
    d = tiny_model_dirs["gpt2"]
    settings = dict(SMALL, ablations=("resample", "zero"), heads="L1")
    ingest_tiny(d, tmp_path / "grown", tokens=93, **settings)  # 3 rows: batches [0, 2) and [2, 3)
    grown = ingest_tiny(d, tmp_path / "grown", tokens=124, **settings)
    # The partial batch is redone as [2, 4) (clean + both ablations), superseding [2, 3);
    # batch [0, 2)'s resample pairs pointed at the old last batch, so it is redone too, and
    # its zero shard as well when the grown top-p% sets changed its detail.
    assert 1 + 2 + 1 <= grown.shards_written <= 1 + 2 + 2
    ingest_tiny(d, tmp_path / "once", tokens=124, **settings)
    # Top-p% token sets grow with the token count: shards whose detail followed the sets of
    # 93 tokens are redone too, so the detail tables equal one run's as well.
    _assert_same(_tables(tmp_path / "grown"), _tables(tmp_path / "once"))
    assert verify(tmp_path / "grown").ok


def test_sr_mlps_neuron_detail_extends_like_one_run(tiny_model_dirs, tmp_path):
    """Naming heads for neuron detail by sr_mlps later, more of them, and more tokens (after a
    compaction) leave the same tables as one run naming them all; nothing is left to do after."""
    from selfrepair.store.compact import compact

    d = tiny_model_dirs["gpt2"]
    grown, once = tmp_path / "grown", tmp_path / "once"
    base = dict(SMALL, ablations=("resample", "zero"))
    ingest_tiny(d, grown, tokens=93, **base)
    added = ingest_tiny(d, grown, tokens=93, sr_mlps_neurons="L1H0", **base)
    assert 0 < added.shards_written <= 2 * 2  # neuron detail shards only: at most one per batch and draw
    compact(grown)
    ingest_tiny(d, grown, tokens=124, sr_mlps_neurons="L0H1,L1H2", **base)  # L1H0 is kept up to date too
    assert ingest_tiny(d, grown, tokens=124, **base).shards_written == 0
    ingest_tiny(d, once, tokens=124, sr_mlps_neurons="L1H0,L1H2,L0H1", **base)
    got, want = _tables(grown), _tables(once)
    _assert_same(got, want)
    extra = want["neuron_totals"].join(want["ablation_top"], on=["ablation", "sample", "layer", "head", "token_index"],
                                       how="anti")
    assert extra.height > 0 and set(extra.select("layer", "head").unique().iter_rows()) <= {(1, 0), (1, 2), (0, 1)}
    assert verify(grown).ok
    compact(grown)
    _assert_same(_tables(grown), want)
    assert verify(grown).ok
