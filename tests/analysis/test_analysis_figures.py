"""Every figure draws exactly its named query's rows, and every file written is valid."""

from __future__ import annotations

import io
import re

import numpy as np
import polars as pl
import pytest
from PIL import Image
from polars.testing import assert_frame_equal

from chromium_page import run_chromium

from selfrepair.analysis import registry
from selfrepair.analysis.heads import default_heads
from selfrepair.analysis.spec import fetch

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def expected_frame(store, entry) -> pl.DataFrame:
    """The query's rows for the entry's models, run by run, without the report's code path."""
    frames = []
    for params in entry.runs:
        df = store.query(entry.spec.query, **params).filter(pl.col("model").is_in(entry.ctx.names))
        frames.append(df)
    return pl.concat(frames, how="vertical_relaxed")


def drawn(built):
    return [e for e in built.figures if e.png is not None]


def test_every_figure_is_in_the_report(built):
    names = {e.spec.name for e in built.figures}
    # The unit figure is left out of a store of heads alone (test_unit_pages.py draws it), the training-step
    # figure out of a store without two revisions of one model (tests/ingest/test_revisions.py draws it), the
    # channels' figure out of a store without counterfactual re-runs (tests/ingest/test_counterfactual.py draws it).
    assert names == {s.name for s in registry.FIGURES} - {"fig_unit_breakdown", "fig_training_steps",
                                                           "fig_repair_channels"}
    assert len(registry.FIGURES) == 20


def test_data_drawn_equals_the_named_query(built, tiny_query_store):
    for entry in drawn(built):
        want = expected_frame(tiny_query_store, entry)
        got = entry.data.select(want.columns)
        # DuckDB's parallel avg() may differ in the last bits between runs of one query.
        assert_frame_equal(got, want, check_exact=False, rel_tol=1e-9, abs_tol=1e-12)
        assert entry.data.height > 0, entry.spec.name


def test_figure_one_points_are_the_query_rows(tiny_query_store, built):
    entry = next(e for e in built.figures if e.spec.name == "fig_self_repair_by_depth")
    spec = registry.figure("fig_self_repair_by_depth")
    from selfrepair.analysis.style import rc

    with rc():
        fig = spec.plot(entry.data, entry.ctx)
    from matplotlib.collections import LineCollection, PathCollection

    scatters = [c for c in fig.axes[0].collections if isinstance(c, PathCollection)]
    bars = [c for c in fig.axes[0].collections if isinstance(c, LineCollection)]  # the heads' CI error bars
    assert len(scatters) == len(bars) == len(entry.ctx.models)
    query = tiny_query_store.query("head_top_self_repair", p=entry.ctx.p, ablation=entry.ctx.ablation)
    for model, points, bar in zip(entry.ctx.names, scatters, bars):
        rows = query.filter(pl.col("model") == model)
        np.testing.assert_allclose(points.get_offsets()[:, 0], rows["rel_depth"].to_numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(points.get_offsets()[:, 1], rows["sr"].to_numpy(), rtol=1e-9, atol=1e-12)
        ends = np.array([seg[:, 1] for seg in bar.get_segments()])  # [head, (low, high)]
        np.testing.assert_allclose(ends, rows.select("sr_ci_low", "sr_ci_high").to_numpy(), rtol=1e-9, atol=1e-12)


def test_de_vs_dlogit_points_are_the_query_rows(tiny_query_store, built):
    entry = next(e for e in built.figures if e.spec.name == "fig_de_vs_dlogit")
    from selfrepair.analysis.style import rc

    with rc():
        fig = registry.figure("fig_de_vs_dlogit").plot(entry.data, entry.ctx)
    rows = tiny_query_store.query("fig_head_de_vs_dlogit", ablation=entry.ctx.ablation).filter(
        pl.col("model") == entry.ctx.model.name)
    offsets = fig.axes[0].collections[0].get_offsets()
    np.testing.assert_allclose(offsets[:, 0], rows["de_clean"].to_numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(offsets[:, 1], rows["d_logit"].to_numpy(), rtol=1e-9, atol=1e-12)


def test_dlogit_vs_output_points_are_the_query_rows(tiny_query_store, built):
    """Both panels: one point per head, d_logit against d_loss and against kl (fig_dlogit_vs_output)."""
    entry = next(e for e in built.figures if e.spec.name == "fig_dlogit_vs_output")
    from selfrepair.analysis.style import rc

    with rc():
        fig = registry.figure("fig_dlogit_vs_output").plot(entry.data, entry.ctx)
    rows = tiny_query_store.query("fig_dlogit_vs_output", ablation=entry.ctx.ablation).filter(
        pl.col("model") == entry.ctx.model.name)
    assert rows.height > 0 and rows["kl"].null_count() == 0
    for ax, col in zip(fig.axes[:2], ("d_loss", "kl")):
        offsets = ax.collections[0].get_offsets()
        np.testing.assert_allclose(offsets[:, 0], rows["d_logit"].to_numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(offsets[:, 1], rows[col].to_numpy(), rtol=1e-9, atol=1e-12)


def test_titles_state_model_tokens_ablation_and_p(built):
    for entry in drawn(built):
        facts = entry.ctx.facts()
        for m in entry.ctx.models:
            assert m.name in facts and f"{m.n_tokens:,} tokens" in facts
        assert "ablation" in facts and f"p = {entry.ctx.p:g}" in facts


def test_png_and_pdf_files_are_valid(report_dir):
    pngs = sorted((report_dir / "figures").glob("*.png"))
    pdfs = sorted((report_dir / "figures").glob("*.pdf"))
    # all-model figures (and the authors' versions of 3); per-model ones but the skipped spread (and
    # the authors' versions of 6)
    assert len(pngs) == len(pdfs) == 3 + 3 + (13 + 6) * 3
    for path in pngs:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE), path
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.size[0] > 100 and image.size[1] > 50
    for path in pdfs:
        data = path.read_bytes()
        assert data.startswith(b"%PDF"), path
        assert b"CreationDate" not in data, path  # no dates: deterministic


def test_output_is_deterministic(tiny_query_store, tmp_path):
    from selfrepair.analysis.report import build_report

    names = ["fig_self_repair_by_depth", "fig_backup_map"]
    a = build_report(tiny_query_store, tmp_path / "a", models=["tiny-gpt2"], figures=names)
    b = build_report(tiny_query_store, tmp_path / "b", models=["tiny-gpt2"], figures=names)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    # 2 figures (and the authors' version of the first) × png/pdf, 2 tables × csv/tex, the page, 4 head pages
    assert len(files) == 6 + 4 + 1 + 4
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert a.path.read_text() == b.path.read_text()


def test_tables_equal_their_named_queries(report_dir, tiny_query_store, built):
    for entry in built.tables:
        want = tiny_query_store.query(entry.spec.query, **entry.runs[0])
        assert_frame_equal(entry.frame, want, check_exact=False, rel_tol=1e-9, abs_tol=1e-4)
        csv = pl.read_csv(report_dir / "tables" / f"{entry.spec.name}.csv")
        assert csv.columns == want.columns
        assert csv.height == want.height
        np.testing.assert_allclose(csv["DE"].to_numpy(), want["DE"].to_numpy())
        tex = (report_dir / "tables" / f"{entry.spec.name}.tex").read_text()
        # a table (a longtable beyond 40 rows) with the spec's caption and label (issue 22)
        assert (r"\begin{tabular}" in tex or r"\begin{longtable}" in tex) and r"\toprule" in tex and r"(\%)" in tex
        assert rf"\label{{tab:{entry.spec.name}}}" in tex and r"\caption{" in tex


def test_layer_table_matches_breakdown(tiny_query_store):
    table = tiny_query_store.query("table_layer_breakdown", p=0.05)
    breakdown = tiny_query_store.query("breakdown", p=0.05)
    np.testing.assert_allclose(table["LN share (%)"].to_numpy(),
                               np.round(100 * breakdown["ln_share"].to_numpy(), 1), atol=0.051)
    np.testing.assert_allclose(table["Self-repair"].to_numpy(), breakdown["sr"].to_numpy(), atol=5.1e-5)


def test_skipped_figures_say_why(built):
    notes = {e.spec.name: e.note for e in built.figures if e.note}
    assert set(notes) == {"fig_resample_spread"}
    assert "only one resample draw" in notes["fig_resample_spread"]


def test_default_heads_are_the_largest_de_in_the_last_third():
    top = pl.DataFrame({"layer": [0, 4, 4, 5, 5, 3], "head": [0, 0, 1, 0, 1, 0],
                        "de_clean": [9.0, 0.1, 0.5, 0.3, 0.5, 8.0]})
    assert default_heads(top, n_layers=6, k=3) == ((4, 1), (5, 1), (5, 0))


def test_fetch_adds_run_parameters(tiny_query_store):
    runs = [{"layer": 1, "head": h, "p": 0.05, "ablation": "resample", "sample": 0} for h in (0, 1)]
    df = fetch(tiny_query_store.query, "head_tokens", runs, ["tiny-gpt2"])
    assert df.height == 2 * 310
    assert df.group_by("head").len().sort("head")["len"].to_list() == [310, 310]


def test_share_axes_stay_readable_when_a_mean_de_is_near_zero():
    """One layer's share of −1250% (DE ≈ 0) no longer squeezes the others: the axis is capped
    and the point is drawn on its edge, and the caption says so."""
    from selfrepair.analysis.style import SHARE_LIMITS, keep_readable, new_figure

    fig, axes = new_figure()
    ax = axes[0, 0]
    ax.plot([0.0, 0.5, 1.0], [-1250.0, 20.0, 35.0], marker="o")
    ax.scatter([0.1, 0.6], [15.0, 900.0])
    ax.axhline(0, color="black")
    note = keep_readable(ax)
    assert ax.get_ylim() == SHARE_LIMITS
    assert note.startswith(" 2 value(s) beyond -100%…200%")
    fig2, axes2 = new_figure()
    axes2[0, 0].plot([0, 1], [10.0, 60.0])
    assert keep_readable(axes2[0, 0]) == "" and axes2[0, 0].get_ylim() != SHARE_LIMITS


# The report in headless Chromium: here, beside the other report tests, so one process builds the report.
@pytest.mark.browser
@pytest.mark.slow
def test_report_loads_in_chromium(report_dir, tmp_path):
    page = (report_dir / "report.html").as_uri()
    dom = run_chromium(["--dump-dom", page], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    status = re.search(r'<p id="report-status"([^>]*)>', dom.stdout)
    assert status, dom.stdout[:2000]
    attrs = dict(re.findall(r'data-(\w+)="(\d+)"', status.group(1)))
    assert attrs, f"the status script did not run: {status.group(0)}"
    n_images = len(list((report_dir / "figures").glob("*.png")))
    assert int(attrs["images"]) == n_images
    assert int(attrs["loaded"]) == n_images  # naturalWidth > 0 for every <img>
    assert int(attrs["errors"]) == 0

    shot = tmp_path / "report.png"
    result = run_chromium([f"--screenshot={shot}", "--window-size=1200,2400", page], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_report_is_self_contained(report_dir):
    text = (report_dir / "report.html").read_text()
    # No network: every image is inline, and no resource is fetched from anywhere.
    assert not re.search(r'\b(?:src|href)="(?:https?:)?//', text)
    assert text.count('src="data:image/png;base64,') == len(list((report_dir / "figures").glob("*.png")))
    # The SQL and parameters of every figure and table sit beside it (both halves of a pair drawn
    # with the authors' statistic beside the store's).
    pairs = text.count('<div class="pair">')
    assert pairs >= 8
    assert text.count("<details>") == text.count("<section") + pairs
    assert text.count("The paper's statistic (as its authors' code computed it)") == pairs
    assert "FROM self_repair_top($p)" in text
    assert "{&quot;p&quot;: 0.05, &quot;ablation&quot;: &quot;resample&quot;, &quot;sample&quot;: 0}" in text
    assert "Not drawn: only one resample draw was ingested for tiny-gpt2" in text
