"""`selfrepair head` and `selfrepair info`: the page per head in the terminal and in Chromium,
its numbers against a recomputation from the raw Parquet files, and one-line refusals."""

from __future__ import annotations

import math
import re

import polars as pl
import pytest
from click.testing import CliRunner
from chromium_page import run_chromium

from selfrepair.cli import main
from selfrepair.store.model_store import ModelStore

MODEL = "tiny-gpt2"


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def _raw(store, table: str) -> pl.DataFrame:
    """One table of MODEL read straight from the files its manifest lists (no views, no SQL)."""
    ms = ModelStore(store / MODEL)
    return pl.read_parquet(ms.table_files(table, ms.manifest()))


def _expected_summary(store, layer: int, head: int) -> dict:
    """Means over the head's top-p% tokens, by DESIGN.md's rule, recomputed with Polars."""
    manifest = ModelStore(store / MODEL).manifest()
    n, top_p = manifest.n_tokens, manifest.config.top_p
    h = _raw(store, "head_effects").filter((pl.col("layer") == layer) & (pl.col("head") == head))
    top = h.sort(["de", "token_index"], descending=[True, False]).head(math.floor(top_p * n))
    a = _raw(store, "ablation_effects").filter((pl.col("layer") == layer) & (pl.col("head") == head)
                                               & (pl.col("ablation") == "resample") & (pl.col("sample") == 0))
    j = top.join(a, on=["layer", "head", "token_index"], suffix="_abl").with_columns(pl.all().exclude(
        "ablation").cast(pl.Float64, strict=False))
    sr = pl.col("d_logit") - (pl.col("de_abl") - pl.col("de"))
    return j.select(n_tokens=pl.len(), de_clean=pl.col("de").mean(), d_logit=pl.col("d_logit").mean(),
                    sr=sr.mean(), sr_heads=pl.col("d_de_heads").mean(), sr_mlps=pl.col("d_de_mlps").mean()).row(0, named=True)


def test_head_page_in_the_terminal(tiny_store):
    from selfrepair.analysis.head_page import build_head_page
    from selfrepair.queries.store import Store

    result = invoke("head", "L1H2", "--store", str(tiny_store), "--model", MODEL, "--tokens", "5")
    assert result.exit_code == 0, result.output
    out = result.output
    for section in ("self-repair", "Top tokens in their text", "repair it (d_de > 0)", "work against it",
                    "Anti-erasure neurons", "Where it attends"):
        assert section in out, section
    token_lines = [ln for ln in out.splitlines() if ln.startswith("  DE ")]
    assert len(token_lines) == 5 and all("⟦" in ln and "⟧" in ln for ln in token_lines)
    attends = [ln for ln in out.split("Where it attends", 1)[1].splitlines() if ln.startswith("  ⟦")]
    assert len(attends) == 5 and all(ln.count("(0.") + ln.count("(1.") >= 1 for ln in attends)
    with Store.open(tiny_store) as s:
        page = build_head_page(s, "L1H2", model=MODEL)
    want = _expected_summary(tiny_store, 1, 2)
    assert page.summary["n_tokens"] == want["n_tokens"]
    for key in ("de_clean", "d_logit", "sr", "sr_heads", "sr_mlps"):
        assert page.summary[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    # The split adds up, and both signs of downstream components are listed.
    s = page.summary
    assert s["sr"] == pytest.approx(s["sr_heads"] + s["sr_mlps"] + s["sr_ln"], abs=1e-9)
    assert set(page.repair["direction"]) <= {"repairs", "works against"} and page.repair.height


def test_tokens_with_newlines_and_tabs_stay_on_one_line():
    from selfrepair.analysis.head_page import visible

    assert visible("a\n\tb\r") == "a⏎⇥b␍"


@pytest.mark.parametrize("args,line", [
    (["L1H9"], "Error: head 9 is not a head index of tiny-gpt2 (0..3)"),
    (["L7H0"], "Error: layer 7 is not a layer of tiny-gpt2 (0..1)"),
    (["1H2"], "Error: head '1H2': use a label like L26H6 (layer 26, head 6)"),
    (["L1H2", "--ablation", "Zero"], "Error: ablation 'Zero' was not ingested"),
    (["L1H2", "--sample", "4"], "Error: resample draw 4 was not ingested; stored draws: 0"),
    (["L1H2", "--p", "1.5"], "Error: p = 1.5 is outside (0, 1]"),
    (["L1H2", "--model", "nope"], "Error: model 'nope' is not in this store"),
])
def test_head_refuses_what_was_not_ingested_with_one_line(tiny_store, args, line):
    extra = [] if "--model" in args else ["--model", MODEL]
    result = invoke("head", *args, *extra, "--store", str(tiny_store))
    assert result.exit_code == 1
    assert result.output.startswith(line) and result.output.count("\n") == 1, result.output


def test_head_needs_a_model_when_the_store_has_several(tiny_store):
    result = invoke("head", "L1H2", "--store", str(tiny_store))
    assert result.exit_code == 1 and "pick one with --model" in result.output


@pytest.mark.browser
def test_head_html_opens_in_chromium(tiny_store, tmp_path):
    page = tmp_path / "L1H2.html"
    result = invoke("head", "L1H2", "--store", str(tiny_store), "--model", MODEL, "--tokens", "4", "--html", str(page))
    assert result.exit_code == 0, result.output
    dom = run_chromium(["--dump-dom", page.as_uri()], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-head="L1H2"' in dom.stdout
    rows = re.findall(r'<span class="tok">', dom.stdout)
    assert len(rows) == 4  # each shown token highlighted
    assert "Anti-erasure neurons" in dom.stdout


def test_head_html_inside_the_store_is_refused(tiny_store):
    before = sorted(p.name for p in (tiny_store / MODEL).iterdir())
    result = invoke("head", "L1H2", "--store", str(tiny_store), "--model", MODEL,
                    "--html", str(tiny_store / MODEL / "manifest.json"))
    assert result.exit_code == 1 and "inside the store" in result.output
    assert sorted(p.name for p in (tiny_store / MODEL).iterdir()) == before


def test_info_lists_each_model(tiny_store):
    result = invoke("info", "--store", str(tiny_store))
    assert result.exit_code == 0, result.output
    for model in ("tiny-gpt2", "tiny-neox", "tiny-llama"):
        assert re.search(rf"^{model}: 2 layers × 4 heads; 310 tokens", result.output, re.M), result.output
    assert result.output.count("  zero     draw 0: heads all (8)") == 3
