"""The self-check covers what the run ablates, no more: heads of its ablated layers, each case once under
the ablation types in turn, on the first CHECK_ROWS rows (issue 22); its progress shows."""

from __future__ import annotations

from selfrepair.ingest.selfcheck import CHECK_ROWS, check_plan, check_steps, sample_heads


def test_sample_heads_come_from_the_ablated_layers():
    assert sample_heads(30, 9) == [(0, 1), (15, 4), (29, 2)]  # the whole model: first, middle, last layer
    every = [(l, h) for l in range(30) for h in range(9)]
    assert sample_heads(30, 9, every) == sample_heads(30, 9)
    # Only layers 9 and 10 ablated: no head of layers 0 or 29 is checked; the rule's head where ablated.
    assert sample_heads(30, 9, [(9, 0), (9, 3), (10, 6), (10, 2)]) == [(9, 0), (10, 6)]
    assert sample_heads(30, 9, [(12, 5)]) == [(12, 5)]
    assert sample_heads(30, 9, []) == []  # MLP units only: their cases come from unit_cases


def test_each_case_once_with_every_ablation_type_at_least_once():
    heads = [(0, 1), (15, 4), (29, 2)]
    assert check_plan(heads, [], ["resample"]) == [("resample", ("head", h)) for h in heads]
    plan = check_plan(heads, ["MLP3 case"], ["resample", "mean", "zero"])
    assert [k for k, _ in plan] == ["resample", "mean", "zero", "resample"]
    assert [item for _, item in plan] == [("head", h) for h in heads] + [("unit", "MLP3 case")]
    # More types than cases: the cases repeat until every type is checked.
    assert check_plan([(5, 0)], [], ["resample", "mean", "zero"]) == [
        ("resample", ("head", (5, 0))), ("mean", ("head", (5, 0))), ("zero", ("head", (5, 0)))]
    assert check_plan([], [], ["zero"]) == []
    assert check_steps(heads, [], ["resample"]) == 4  # the clean comparisons, then each ablated one
    assert CHECK_ROWS == 1


def test_a_broken_resample_head_pass_is_still_refused(tiny_model_dirs, tmp_path, monkeypatch):
    # One checked row and its resample source row: an engine off by 1% on a head's ablation fails.
    import dataclasses

    from click.testing import CliRunner

    from selfrepair.cli import main
    from selfrepair.ingest import ablate

    patch = ablate.FastBatch.patch

    def off_for_heads(self, layer, heads, z_new, u):
        r = patch(self, layer, heads, z_new, u)
        return dataclasses.replace(r, logit=r.logit * 1.01) if z_new is not None else r

    monkeypatch.setattr(ablate.FastBatch, "patch", off_for_heads)
    store = tmp_path / "s"
    res = CliRunner().invoke(main, ["ingest", "--model", str(tiny_model_dirs["gpt2"]), "--store", str(store),
                                    "--tokens", "124", "--seq-len", "32", "--batch-size", "2", "--corpus", "embedded",
                                    "--ablations", "resample", "--heads", "L1", "--quiet"])
    assert res.exit_code == 1, res.output
    assert res.output.startswith("Error: self-check failed for GPT-2: ") and " resample L1H" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    assert not store.exists() or not any(store.iterdir())
