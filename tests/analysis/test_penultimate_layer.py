"""The penultimate-layer figures draw the latest layer that has ablated heads (and sr_mlps neuron detail where
they need it) and say which, instead of "Not drawn" (issue 22)."""

from __future__ import annotations

from dataclasses import replace

import polars as pl

from selfrepair.analysis import registry
from selfrepair.analysis.context import Context
from selfrepair.analysis.heads import latest_layer, penultimate_head
from selfrepair.analysis.report import QueryCache, figure_entries
from selfrepair.analysis.style import rc


def test_latest_layer_prefers_the_penultimate_one():
    assert latest_layer({3, 27, 28, 29}, 30) == 28  # the authors' layer when it has ablated heads
    assert latest_layer({3, 27, 29}, 30) == 27  # else the latest before it
    assert latest_layer({29}, 30) == 29  # else the last layer
    assert latest_layer(set(), 30) is None


def test_the_paper_head_is_in_the_latest_layer_with_detail():
    top = pl.DataFrame({"layer": [5, 5, 27, 27], "head": [0, 1, 2, 3], "de_clean": [1.0, 2.0, 0.5, 0.7]})
    assert penultimate_head(top, 30, ()) == (27, 3)  # largest DE in layer 27
    assert penultimate_head(top, 30, ((27, 2),)) == (27, 2)  # a chosen head of that layer first
    assert penultimate_head(top, 30, ((27, 2),), detail={(5, 0), (28, 1)}) == (5, 0)  # the ablated one with detail
    assert penultimate_head(top.head(0), 30, ()) is None


def _title(entry) -> str:
    with rc():
        fig = entry.spec.plot(entry.data, entry.ctx)
    return fig.axes[0].get_title()


def test_a_store_without_penultimate_heads_draws_the_latest_layer_and_says_so(built, tiny_query_store):
    full = next(e for e in built.figures if e.spec.name == "fig_final_mlp_share" and e.ctx.model.name == "tiny-gpt2")
    assert full.runs[0]["layer"] == 0 and "penultimate layer 0 heads" in _title(full)
    # As if the ingest had ablated layer 1's heads only (tiny GPT-2: 2 layers, the penultimate is 0).
    model = replace(full.ctx.model, head_layers=(1,))
    ctx = Context(models=(model,), ablation=full.ctx.ablation, p=full.ctx.p)
    query = QueryCache(tiny_query_store)
    for name in ("fig_final_mlp_share", "fig_top_neurons_share"):
        spec = registry.figure(name)
        entries = figure_entries(spec, ctx, {model.name: full.ctx.heads}, query, {model.name: (1, 0)})
        entries += figure_entries(spec.paper, ctx, {model.name: full.ctx.heads}, query, {model.name: (1, 0)})
        for entry in entries:
            if entry.spec.name == "fig_top_neurons_share_paper":  # needs sr_mlps detail: layer 1 has none
                assert entry.png is None and "--sr-mlps-neurons" in entry.note, entry.note
                continue
            assert entry.png is not None, (entry.spec.name, entry.note)
            assert entry.runs[0]["layer"] == 1 and set(entry.data["layer"]) == {1}
            assert "layer 1, the latest with ablated heads (none in the penultimate layer 0)" in _title(entry)
