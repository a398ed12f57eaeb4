"""A partial store is never silent (issue 22): every reader warns with the word "partial" and what is
missing, `--strict` and `Store.open(strict=True)` refuse it, `info` shows the counts, and comparisons
across ablation types and draws keep the tokens all of them cover.

The partial store is a copy of the shared `tiny_store`'s GPT-2 (310 tokens: batches of rows 0-4, 4-8,
8-10; resample, mean and zero) whose manifest keeps zero's first batch and mean's first two only, as
an ingest killed mid-sweep leaves it (tests/store/partial_store.py): no new ingest.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parents[1] / "store"))
from partial_store import partial_copy  # noqa: E402

from selfrepair.analysis.fig_ablation_types import common_tokens  # noqa: E402
from selfrepair.analysis.head_page import build_head_page, html, text  # noqa: E402
from selfrepair.cli import main  # noqa: E402
from selfrepair.errors import PartialStore, PartialStoreWarning  # noqa: E402
from selfrepair.queries.store import Store  # noqa: E402
from selfrepair.store.coverage import coverage  # noqa: E402
from selfrepair.store.model_store import ModelStore  # noqa: E402

MISSING = "mean: 248 of 310 tokens; zero: 124 of 310 tokens"
WARNING = f"warning: partial store: tiny-gpt2 has {MISSING}"
REFUSAL = f"Error: partial store: tiny-gpt2 has {MISSING}; refused (strict): finish the ingest, or read without strict"


def _keep(entry) -> bool:
    """zero: the first batch only (rows 0-4); mean: the first two (rows 0-8); resample: all."""
    return {"zero": 4, "mean": 8}.get(entry.ablation, 10) >= entry.rows[1]


@pytest.fixture(scope="module")
def partial(tiny_store, tmp_path_factory) -> Path:
    return partial_copy(tiny_store / "tiny-gpt2", tmp_path_factory.mktemp("partial"), _keep)


def test_coverage_says_what_is_missing(partial, tiny_store):
    c = coverage("tiny-gpt2", ModelStore(partial / "tiny-gpt2").manifest())
    assert c.partial and c.missing() == ["mean: 248 of 310 tokens", "zero: 124 of 310 tokens"]
    assert {d.ablation: set(d.tokens.values()) for d in c.draws} == {"resample": {310}, "mean": {248}, "zero": {124}}
    full = coverage("tiny-gpt2", ModelStore(tiny_store / "tiny-gpt2").manifest())
    assert not full.partial and full.missing() == [] and full.text() == ""


def test_units_with_fewer_tokens_than_others_are_counted(partial):
    from dataclasses import replace

    zero = next(d for d in coverage("tiny-gpt2", ModelStore(partial / "tiny-gpt2").manifest()).draws
                if d.ablation == "zero")
    fewer = replace(zero, tokens=zero.tokens | {"L0H0": 62})  # one head with fewer tokens than the others
    assert fewer.text() == "zero: 62 to 124 of 310 tokens (8 of 8 units short)"


def test_python_api_warns_and_strict_refuses(partial):
    with pytest.warns(PartialStoreWarning, match=f"^partial store: tiny-gpt2 has {MISSING}$"):
        with Store.open(partial) as s:
            assert s.partial_text() == f"partial store: tiny-gpt2 has {MISSING}"
            assert s.coverage["tiny-gpt2"].partial
    with pytest.raises(PartialStore, match="refused \\(strict\\)"):
        Store.open(partial, strict=True)


def test_a_complete_store_is_silent(tiny_store):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartialStoreWarning)
        with Store.open(tiny_store, strict=True) as s:
            assert s.partial_text() == ""
    res = CliRunner().invoke(main, ["info", "--store", str(tiny_store), "--strict"])
    assert res.exit_code == 0 and "partial" not in res.output and res.stderr == ""


@pytest.mark.parametrize("args", [
    ["sql", "SELECT count(*) AS n FROM tokens"],
    ["query", "layer_summary", "-p", "p=0.05", "-p", "n_boot=5"],
    ["export", "breakdown", "-p", "p=0.05", "-p", "n_boot=5", "--format", "csv", "--output", "{tmp}/out.csv"],
    ["head", "L1H0"],
    ["info"],
], ids=lambda a: a[0])
def test_every_reader_warns_and_strict_refuses(partial, tmp_path, args):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args] + ["--store", str(partial)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines() == [WARNING]
    strict = CliRunner().invoke(main, args + ["--strict"])
    assert strict.exit_code == 1
    assert strict.output.splitlines() == [REFUSAL]


def test_report_strict_refuses(partial, tmp_path):
    res = CliRunner().invoke(main, ["report", "--store", str(partial), "--output", str(tmp_path / "r"), "--strict"])
    assert res.exit_code == 1 and res.output.splitlines() == [REFUSAL]
    assert not (tmp_path / "r" / "report.html").exists()


def test_info_shows_partial_with_counts(partial):
    res = CliRunner().invoke(main, ["info", "--store", str(partial)])
    assert res.exit_code == 0
    lines = res.stdout.splitlines()
    assert f"  partial: {MISSING}" in lines
    assert "           complete: resample (310 tokens each)" in lines


def test_head_page_has_a_partial_banner(partial):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PartialStoreWarning)
        with Store.open(partial) as s:
            page = build_head_page(s, "L1H0")
    assert text(page).splitlines()[2] == f"warning: partial store: tiny-gpt2 has {MISSING}"
    assert f'<p class="partial" id="partial"><b>Partial</b>: partial store: tiny-gpt2 has {MISSING}.</p>' in html(page)


def test_ablation_types_compare_on_the_tokens_all_cover(partial):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PartialStoreWarning)
        with Store.open(partial) as s:
            frames = [s.query("head_tokens", layer=1, head=0, p=0.05, ablation=k).with_columns(pl.lit(k).alias("ablation"))
                      for k in ("resample", "mean", "zero")]
    df = pl.concat(frames, how="vertical_relaxed")
    kept, dropped = common_tokens(df, ["resample", "mean", "zero"])
    # zero covers rows 0-4 only: 124 tokens, each under all three types; the rest of resample and mean goes.
    assert sorted(kept["token_index"].unique().to_list()) == list(range(124))
    assert kept.height == 3 * 124 and dropped == (310 - 124) + (248 - 124)
