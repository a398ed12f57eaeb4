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
    assert CHECK_ROWS == 2
