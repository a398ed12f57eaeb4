"""`selfrepair report` options: bad heads and models give one Error line; tables export."""

from __future__ import annotations

from click.testing import CliRunner

from selfrepair.cli_report import report


def invoke(*args):
    return CliRunner().invoke(report, list(args))


def test_unknown_head_label(tiny_store, tmp_path):
    result = invoke("--store", str(tiny_store), "--heads", "L1X2", "--output", str(tmp_path))
    assert result.exit_code == 2
    assert "'L1X2' is not a head label like L9H11" in result.output


def test_head_outside_the_model(tiny_store, tmp_path):
    result = invoke("--store", str(tiny_store), "--heads", "L9H11", "--output", str(tmp_path))
    assert result.exit_code == 1
    assert result.output == "Error: heads: L9H11 is not a head of tiny-gpt2 (2 layers × 4 heads)\n"


def test_unknown_model(tiny_store, tmp_path):
    result = invoke("--store", str(tiny_store), "--models", "nope", "--output", str(tmp_path))
    assert result.exit_code == 1
    assert result.output.startswith("Error: no model 'nope' in ")


def test_heads_and_model_options(tiny_store, tmp_path):
    result = invoke("--store", str(tiny_store), "--models", "tiny-llama", "--heads", "L0H1,L1H3",
                    "--ablation", "zero", "--output", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert result.output == (f"wrote {tmp_path / 'report.html'} (16 figures, 1 not drawn; beside them 9 with the "
                             "authors' statistic, 0 not drawn; 2 tables)\n")
    page = (tmp_path / "report.html").read_text()
    # Each selected head links to its own page, which the report wrote.
    assert ('selected heads <a class="head" href="heads/tiny-llama__L0H1.html">L0H1</a>, '
            '<a class="head" href="heads/tiny-llama__L1H3.html">L1H3</a>') in page
    assert (tmp_path / "heads" / "tiny-llama__L1H3.html").read_text().count('data-head="L1H3"') == 1
    assert 'Drawn for <a class="head" href="heads/tiny-llama__L0H1.html">L0H1</a>.' in page
    assert "tiny-gpt2" not in page
    assert (tmp_path / "figures" / "fig_token_noise__tiny-llama.png").exists()
    assert "zero ablation" in page


def test_table_queries_export_as_latex(tiny_store, tmp_path):
    from selfrepair.cli import main

    out = tmp_path / "layers.tex"
    result = CliRunner().invoke(main, ["export", "table_layer_breakdown", "--store", str(tiny_store),
                                       "--param", "p=0.05", "--format", "latex", "--output", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    # Every model has the same top-token count: the constant column is dropped and named above the table.
    # Issue 22: the packages first, then the dropped column; multi-word headers stacked to the cells' width;
    # ten columns are wider than FIT_COLUMNS: scaled to the line (graphicx) only if they overflow it.
    assert text.splitlines()[:2] == [r"% needs: \usepackage{booktabs}, \usepackage{graphicx}",
                                     "% constant columns, dropped: Tokens = 60"]
    assert r"\caption{Self-repair breakdown per layer (paper table)}" in text and r"\label{tab:table_layer_breakdown}" in text
    header = next(line for line in text.splitlines() if line.startswith("Model & Layer & DE & "))
    assert header.count("&") == 9 and r"\shortstack{Logit\\change}" in header and r"(\%)" in header


def test_a_head_that_was_not_ablated_is_refused(tiny_model_dirs, tmp_path):
    """The report draws nothing empty: a head the ingest never ablated gets one line."""
    from tiny_models import ingest_tiny

    store = tmp_path / "store"
    ingest_tiny(tiny_model_dirs["gpt2"], store, heads="L1", ablations=("zero",))
    result = invoke("--store", str(store), "--heads", "L0H1", "--output", str(tmp_path / "r"))
    assert result.exit_code == 1
    assert result.output == "Error: head L0H1 was not ablated; stored heads: tiny-gpt2 zero draw 0: L1\n"
    result = invoke("--store", str(store), "--p", "0.001", "--output", str(tmp_path / "r"))
    assert result.exit_code == 1 and "keeps no token" in result.output
