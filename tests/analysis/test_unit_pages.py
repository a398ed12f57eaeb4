"""Every reader knows units (issue 20): `selfrepair head` for groups, ATTN, MLP, BLOCK and conditions,
`info`'s units, `query`'s unit parameters and the report's unit figure, their numbers against a
recomputation from the raw Parquet files, and one-line refusals that name what is stored."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from selfrepair.cli import main
from selfrepair.store.labels import parse_unit
from selfrepair.store.model_store import ModelStore

MODEL = "tiny-gpt2"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def units_query_store(unit_store):
    from selfrepair.queries.store import Store

    with Store.open(unit_store) as s:
        yield s


def _raw(store, table: str) -> pl.DataFrame:
    """One table of MODEL read straight from the files its manifest lists (no views, no SQL)."""
    ms = ModelStore(store / MODEL)
    return pl.read_parquet(ms.table_files(table, ms.manifest()))


def _top_tokens(store, canonical: str) -> list[int]:
    """The unit's top-p% tokens by DESIGN.md's rule: floor(top_p · N) by the sum of its components'
    clean DE, largest first, ties to the lower token_index."""
    manifest = ModelStore(store / MODEL).manifest()
    unit = parse_unit(canonical)
    n_heads = manifest.model.n_heads
    heads = _raw(store, "head_effects").filter(
        (pl.col("layer").cast(pl.Int64) * n_heads + pl.col("head"))
        .is_in([l * n_heads + h for l, h in unit.heads(n_heads)]))
    mlps = _raw(store, "mlp_effects").filter(pl.col("layer").is_in(list(unit.mlps())))
    de = (pl.concat([heads.select("token_index", pl.col("de").cast(pl.Float64)),
                     mlps.select("token_index", pl.col("de").cast(pl.Float64))])
          .group_by("token_index").agg(pl.col("de").sum()))
    k = math.floor(manifest.config.top_p * manifest.n_tokens)
    return de.sort(["de", "token_index"], descending=[True, False]).head(k)["token_index"].to_list()


def _expected(store, canonical: str, label: str, condition: str = "", ablation: str = "resample",
              sample: int = 0) -> dict:
    """Means over the unit's top tokens of its own ablation rows (the condition's, when given)."""
    top = _top_tokens(store, canonical)
    a = _raw(store, "ablation_effects").filter(
        (pl.col("unit") == label) & (pl.col("condition") == condition) & (pl.col("ablation") == ablation)
        & (pl.col("sample") == sample) & pl.col("token_index").is_in(top)
    ).with_columns(pl.col("d_logit", "de", "de_base", "d_de_heads", "d_de_mlps").cast(pl.Float64))
    return a.select(n_tokens=pl.len(), de_clean=pl.col("de_base").mean(), de_ablated=pl.col("de").mean(),
                    d_logit=pl.col("d_logit").mean(),
                    sr=(pl.col("d_logit") - (pl.col("de") - pl.col("de_base"))).mean(),
                    sr_heads=pl.col("d_de_heads").mean(), sr_mlps=pl.col("d_de_mlps").mean()).row(0, named=True)


CASES = [  # what the user types, --given, the stored label, the canonical label
    ("MLP1", None, "MLP1", "MLP1"),
    ("ATTN1", None, "ATTN1", "ATTN1"),
    ("block0", None, "BLOCK0", "BLOCK0"),
    ("bk", None, "bk", "L1H0+L1H3"),
    ("L1H3+L1H0", None, "bk", "L1H0+L1H3"),
    ("L1H2", "L0H1", "L1H2", "L1H2"),
    ("MLP1", "l0h1", "MLP1", "MLP1"),
    ("BK", "L0H1", "bk", "L1H0+L1H3"),
]


@pytest.mark.parametrize("label,given,stored,canonical", CASES)
def test_unit_page_numbers_match_the_raw_rows(unit_store, units_query_store, label, given, stored, canonical):
    from selfrepair.analysis.head_page import build_head_page

    page = build_head_page(units_query_store, label, given=given, n_tokens=3)
    cond = "L0H1" if given else ""
    assert page.unit.label == stored and page.unit.canonical == canonical
    assert (page.condition.label if page.condition else "") == cond
    want = _expected(unit_store, canonical, stored, cond)
    assert page.summary["n_tokens"] == want["n_tokens"] == 6
    for key in ("de_clean", "de_ablated", "d_logit", "sr", "sr_heads", "sr_mlps"):
        assert page.summary[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    s = page.summary
    assert s["sr"] == pytest.approx(s["sr_heads"] + s["sr_mlps"] + s["sr_ln"], abs=1e-9)
    # The tokens shown are the unit's top tokens, largest baseline DE first.
    assert set(page.tokens["token_index"]) <= set(_top_tokens(unit_store, canonical)) and page.tokens.height == 3
    assert page.tokens["de_clean"].to_list() == sorted(page.tokens["de_clean"].to_list(), reverse=True)
    # Repair sources: components outside the unit, each the mean of its raw rows over the unit's tokens.
    unit = parse_unit(canonical)
    inside = {f"L{l}H{h}" for l, h in unit.heads(4)} | {f"MLP{l}" for l in unit.mlps()}
    # (nothing lies downstream of the final MLP)
    assert bool(page.repair.height) != (1 in unit.mlps()) and not set(page.repair["component"]) & inside
    raw = _raw(unit_store, "repair_sources").filter(
        (pl.col("unit") == stored) & (pl.col("condition") == cond) & (pl.col("ablation") == "resample")
        & (pl.col("sample") == 0))
    for r in page.repair.iter_rows(named=True):
        rows = raw.filter((pl.col("src_layer") == r["src_layer"]) & (pl.col("src_head") == r["src_head"]))
        assert r["d_de"] == pytest.approx(rows["d_de"].cast(pl.Float64).mean(), rel=1e-5, abs=1e-8)
        assert r["n_tokens"] == rows.height
    # Attention only for heads; neuron rows only for units without the final MLP (MLP1 here).
    assert (page.attention is not None) == (unit.kind == "head")
    assert page.neurons.is_empty() == (1 in unit.mlps())


def test_a_conditioned_page_compares_with_the_unit_alone(unit_store, units_query_store):
    from selfrepair.analysis.head_page import build_head_page, text

    page = build_head_page(units_query_store, "L1H2", given="L0H1")
    alone = _expected(unit_store, "L1H2", "L1H2")
    assert page.alone["d_logit"] == pytest.approx(alone["d_logit"], rel=1e-5, abs=1e-7)
    out = text(page)
    assert out.startswith("L1H2 given L0H1 of tiny-gpt2: resample ablation draw 0, top 0.05 of tokens (6 tokens)")
    assert "DE given L0H1 " in out and "Where it attends on those tokens" in out
    assert "ablated alone on the same tokens" in out


def test_resample_draws_of_a_unit(unit_store, units_query_store):
    from selfrepair.analysis.head_page import build_head_page

    page = build_head_page(units_query_store, "MLP0")
    assert page.draws["sample"].to_list() == [0, 1]
    for sample, sr in zip(page.draws["sample"], page.draws["sr"]):
        assert sr == pytest.approx(_expected(unit_store, "MLP0", "MLP0", sample=sample)["sr"], rel=1e-5, abs=1e-7)


def test_head_mlp_in_the_terminal(unit_store):
    result = invoke("head", "MLP0", "--store", unit_store, "--tokens", "2", "--ablation", "zero")
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.startswith("MLP0 of tiny-gpt2: zero ablation, top 0.05 of tokens (6 tokens)\n\n"
                          "The unit: the MLP of layer 0.\nclean DE ")
    assert "Downstream components outside the unit that repair it (d_de > 0)" in out
    assert "Anti-erasure neurons of the final MLP:\n  neuron" in out
    assert "Where it attends" not in out and "Spread across resample draws" not in out
    token_lines = [ln for ln in out.splitlines() if ln.startswith("  DE ")]
    assert len(token_lines) == 2 and all("⟦" in ln for ln in token_lines)


def test_a_unit_holding_the_final_mlp_says_why_it_has_no_neurons(unit_store):
    result = invoke("head", "BLOCK1", "--store", unit_store)
    assert result.exit_code == 0, result.output
    assert ("Anti-erasure neurons of the final MLP:\n  none: BLOCK1 holds the final MLP (MLP1), whose neurons "
            "it replaces\n") in result.output
    assert "The unit: layer 1's heads and MLP (BLOCK1)." in result.output


def test_unit_html_page(unit_store, tmp_path):
    page = tmp_path / "bk.html"
    result = invoke("head", "L1H0+L1H3", "--given", "L0H1", "--store", unit_store, "--tokens", "4", "--html", page)
    assert result.exit_code == 0, result.output
    body = page.read_text()
    assert 'data-head="bk" data-unit-kind="group" data-condition="L0H1"' in body
    assert "<title>bk (L1H0+L1H3) given L0H1 of tiny-gpt2</title>" in body
    assert body.count('<span class="tok">') == 4 and "Where it attends" not in body
    assert "Downstream components outside the unit" in body and "Anti-erasure neurons" in body


STORED = "heads all (8), group bk=L1H0+L1H3, ATTN0..1, MLP0..1, BLOCK0..1"
ADVICE = "use a label like L26H6 (layer 26, head 6), L26H6+L26H9, ATTN26, MLP26, BLOCK26 or a stored group's name"


@pytest.mark.parametrize("args,line", [
    (["MLP9"], f"MLP9 is out of range; the model has layers 0..1; stored units of tiny-gpt2: {STORED}"),
    (["L1H0+L1H1"], f"L1H0+L1H1 is not stored for tiny-gpt2 (resample draw 0); stored units: {STORED}"),
    (["ATTN0", "--given", "L0H1"], "ATTN0 given L0H1 is not stored for tiny-gpt2 (resample draw 0); stored under "
                                   "L0H1: heads L0H0,L0H2,L0H3,L1 (7), group bk=L1H0+L1H3, ATTN1, MLP0..1, BLOCK1"),
    (["L0H1", "--given", "L0H1"], "L0H1 given L0H1 is not stored for tiny-gpt2 (resample draw 0); stored under "
                                  "L0H1: heads L0H0,L0H2,L0H3,L1 (7), group bk=L1H0+L1H3, ATTN1, MLP0..1, BLOCK1"),
    (["L1H9"], "head 9 is not a head index of tiny-gpt2 (0..3)"),
    (["MLP1", "--given", "L1H1"],
     "condition L1H1 is not stored for tiny-gpt2 (resample draw 0); stored conditions: L0H1"),
    (["backup"], f"head 'backup': {ADVICE} (stored groups: bk)"),
    (["MLP1", "--given", "MLP"], f"condition 'MLP': {ADVICE} (stored groups: bk)"),
    (["L1H0+L1H0"], f"head 'L1H0+L1H0': {ADVICE} (stored groups: bk)"),
    (["MLP1", "--sample", "2"], "resample draw 2 was not ingested; stored draws: 0, 1"),
    (["MLP1", "--ablation", "mean"], "ablation 'mean' was not ingested; this store has: resample, zero"),
])
def test_head_refuses_a_unit_not_stored_naming_what_is(unit_store, args, line):
    result = invoke("head", *args, "--store", unit_store)
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: {line}") and result.output.count("\n") == 1, result.output


def test_a_store_of_heads_alone_names_its_heads(tiny_store):
    result = invoke("head", "MLP1", "--store", tiny_store, "--model", MODEL)
    assert result.exit_code == 1
    assert result.output == "Error: MLP1 is not stored for tiny-gpt2 (resample draw 0); stored units: heads all (8)\n"


def test_a_store_of_mlps_alone(tiny_stores, tmp_path):
    store = tiny_stores.copy("gpt2", tmp_path / "s", tokens=62, seq_len=32, batch_size=2, ablations=("zero",),
                             units="mlps", top_p=0.05, neurons_top_k=2)
    result = invoke("info", "--store", store)
    assert result.output.splitlines()[1:3] == ["  zero     draw 0: no heads, 1 batches",
                                               "           other units: 2 MLPs (MLP0..1)"]
    result = invoke("head", "L1H1", "--store", store)
    assert result.output == "Error: L1H1 is not stored for tiny-gpt2 (zero draw 0); stored units: MLP0..1\n"
    result = invoke("head", "MLP0", "--given", "L1H1", "--store", store)
    assert result.output == ("Error: condition L1H1 is not stored for tiny-gpt2 (zero draw 0); stored conditions: "
                             "none (ingest with --given)\n")
    result = invoke("head", "MLP0", "--store", store)
    assert result.exit_code == 0 and result.output.startswith("MLP0 of tiny-gpt2: zero ablation, top 0.05 of tokens")


def test_info_lists_units_groups_and_conditions(unit_store):
    result = invoke("info", "--store", unit_store)
    assert result.exit_code == 0, result.output
    others = ("           other units: 1 group, 2 attention layers, 2 MLPs, 2 blocks "
              "(group bk, ATTN0..1, MLP0..1, BLOCK0..1)")
    given = ("           given L0H1: 7 heads, 1 group, 1 attention layer, 2 MLPs, 1 block "
             "(heads L0H0,L0H2,L0H3,L1 (7), group bk, ATTN1, MLP0..1, BLOCK1)")
    lines = result.output.splitlines()
    assert lines[1:9] == [
        "  resample draw 0: heads all (8), 1 batches", others, given,
        "  resample draw 1: heads all (8), 1 batches", others, given,
        "  zero     draw 0: heads all (8), 1 batches", others,
    ]
    assert lines[9:12] == [given, "  groups: bk = L1H0+L1H3", "  conditions: L0H1 (head)"]
    assert lines[12].startswith("  activations: ")


def test_info_of_a_store_of_heads_alone_is_unchanged(tiny_store):
    from selfrepair.queries.store import Store

    result = invoke("info", "--store", tiny_store)
    with Store.open(tiny_store) as s:
        want = [line for inv in s.inventories for line in inv.lines()]
    assert result.output.splitlines() == want


def test_query_takes_a_unit_by_canonical_label_or_name(unit_store):
    result = invoke("query", "unit_top_self_repair", "-p", "unit=L1H3+L1H0", "-p", "condition=L0H1",
                    "--store", unit_store, "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = result.output.splitlines()
    assert len(rows) == 2 and rows[1].startswith("tiny-gpt2,bk,group,L0H1,1,-1,")
    result = invoke("query", "unit_repair_sources", "-p", "unit=MLP7", "--store", unit_store)
    assert result.exit_code == 1
    assert result.output == (f"Error: MLP7 is out of range; the model has layers 0..1; stored units of tiny-gpt2: "
                             f"{STORED}\n")


@pytest.fixture(scope="module")
def unit_report(units_query_store, tmp_path_factory):
    from selfrepair.analysis.report import build_report

    return build_report(units_query_store, tmp_path_factory.mktemp("unit-report"),
                        figures=["fig_unit_breakdown", "fig_layer_breakdown"])


def test_the_report_draws_each_layer_unit_against_depth(unit_store, unit_report):
    entry = next(f for f in unit_report.figures if f.spec.name == "fig_unit_breakdown")
    assert entry.png is not None and entry.note is None
    assert entry.files == ["figures/fig_unit_breakdown__tiny-gpt2.png", "figures/fig_unit_breakdown__tiny-gpt2.pdf"]
    assert "over each unit's top p% tokens" in entry.caption and "not over all tokens" in entry.caption
    df = entry.data
    assert sorted(df["unit"]) == sorted(["ATTN0", "ATTN1", "MLP0", "MLP1", "BLOCK0", "BLOCK1"])
    for r in df.iter_rows(named=True):
        want = _expected(unit_store, r["unit"], r["unit"])
        assert r["n_tokens"] == want["n_tokens"]
        for key in ("sr", "sr_heads", "sr_mlps", "de_clean", "d_logit"):
            assert r[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (r["unit"], key)
        assert r["sr"] == pytest.approx(r["sr_heads"] + r["sr_mlps"] + r["sr_ln"], abs=1e-9)


def test_a_report_of_heads_alone_has_no_unit_figure(built):
    assert all(f.spec.name != "fig_unit_breakdown" for f in built.figures)
    assert "fig_unit_breakdown" not in built.path.read_text()


def test_draws_of_a_partial_store_use_the_tokens_every_draw_covers(tiny_stores, tmp_path):
    """A unit's spread across draws compares the draws on the same tokens: a draw the ingest left short
    (a partial store) takes the other draws down to its tokens, and n_dropped says how many went."""
    import sys
    import warnings

    sys.path.insert(0, str(Path(__file__).parents[1] / "store"))
    from partial_store import partial_copy

    from selfrepair.analysis.head_page import build_head_page
    from selfrepair.errors import PartialStoreWarning
    from selfrepair.queries.store import Store

    full = tiny_stores.copy("gpt2", tmp_path / "full", tokens=124, seq_len=32, batch_size=2, resamples=2,
                            units="MLP0", top_p=0.2, neurons_top_k=0, activations=())
    folder = next(p for p in full.iterdir() if (p / "manifest.json").exists())
    # the second draw keeps its first batch (rows 0-1) only
    root = partial_copy(folder, tmp_path / "partial", lambda e: not (e.ablation == "resample" and e.sample == 1
                                                                     and e.rows[0] > 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PartialStoreWarning)
        with Store.open(root) as s:
            page = build_head_page(s, "MLP0")
            rows = s.sql("SELECT sample, token_index, sr FROM self_repair_top(0.2) "
                         "WHERE unit = 'MLP0' AND condition = '' AND ablation = 'resample'")
    per = rows.group_by("token_index").agg(pl.col("sample").n_unique().alias("n"))
    common = per.filter(pl.col("n") == 2)["token_index"]
    assert 0 < len(common) < per.height
    assert page.draws["sample"].to_list() == [0, 1]
    for sample, n, sr, dropped in page.draws.select("sample", "n_tokens", "sr", "n_dropped").iter_rows():
        want = rows.filter((pl.col("sample") == sample) & pl.col("token_index").is_in(common.implode()))["sr"]
        assert n == len(common) and dropped == per.height - len(common)
        assert sr == pytest.approx(want.mean(), rel=1e-6, abs=1e-9)
