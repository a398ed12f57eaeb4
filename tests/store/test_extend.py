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
    assert third.shards_written == 2 + 2 and third.shards_skipped == 2 + 2
    assert _count(tmp_path, "SELECT count(*) FROM tokens") == 248
    assert _count(tmp_path, "SELECT count(DISTINCT token_index) FROM ablation_effects WHERE layer = 1") == 248
    assert Store.open(tmp_path).manifest("tiny-gpt2")["n_tokens"] == 248
    assert verify(tmp_path).ok


def test_overwrite_replaces_a_conflicting_run(tiny_model_dirs, tmp_path):
    d = tiny_model_dirs["gpt2"]
    ingest_tiny(d, tmp_path, tokens=124, ablations=("zero",))
    ingest_tiny(d, tmp_path, tokens=124, seq_len=16, ablations=("mean",), overwrite=True)  # seq_len conflicts
    kinds = Store.open(tmp_path).sql("SELECT DISTINCT ablation FROM ablation_effects")["ablation"].to_list()
    assert kinds == ["mean"]
    assert verify(tmp_path).ok
