"""`selfrepair ingest` through click's runner: a good run, and one clear line for each bad input."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from selfrepair import Store
from selfrepair.cli import main


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cli_store(tiny_model_dirs, tmp_path_factory):
    store = tmp_path_factory.mktemp("cli-store")
    res = CliRunner().invoke(main, ["ingest", "--model", str(tiny_model_dirs["gpt2"]), "--store", str(store),
                                    "--tokens", "124", "--seq-len", "32", "--batch-size", "2",
                                    "--corpus", "embedded", "--ablations", "resample,zero"])
    assert res.exit_code == 0, res.output
    return store


def test_ingest_prints_plan_progress_and_summary(cli_store, tiny_model_dirs):
    res = CliRunner().invoke(main, ["ingest", "--model", str(tiny_model_dirs["gpt2"]), "--store", str(cli_store),
                                    "--tokens", "124", "--seq-len", "32", "--batch-size", "2",
                                    "--corpus", "embedded", "--ablations", "resample,zero"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "selfrepair ingest: tiny-gpt2" in out
    assert "0 shards written" in out  # a re-run resumes: everything is already committed
    title = "Per-layer self-repair over each head's top 0.02 tokens (resample ablation):"
    lines = out.splitlines()
    table = lines[lines.index(title) + 1:]
    assert table[0].split() == ["model", "layer", "n_heads", "n_tokens", "de", "d_logit", "sr", "sr_ln",
                                "sr_ci_low", "sr_ci_high"]
    assert set(table[1]) == {"-", " "} and table[4] == "(2 rows)"
    printed = [line.split() for line in table[2:4]]
    # The same numbers recomputed from the raw tables: top floor(0.02·124) = 2 tokens per
    # head by clean DE (ties to the lower token_index), resample draw 0, per layer.
    want = Store.open(cli_store).sql("""
        WITH top AS (
            SELECT model, layer, head, token_index, de FROM (
                SELECT *, row_number() OVER (PARTITION BY model, layer, head ORDER BY de DESC, token_index) AS r
                FROM head_effects) WHERE r <= 2),
        facts AS (
            SELECT top.model, top.layer, top.head, top.de::DOUBLE AS de, a.d_logit::DOUBLE AS d_logit,
                   a.d_logit::DOUBLE - (a.de::DOUBLE - top.de::DOUBLE) AS sr,
                   a.d_logit::DOUBLE - (a.de::DOUBLE - top.de::DOUBLE) - a.d_de_heads - a.d_de_mlps AS sr_ln
            FROM top JOIN ablation_effects a USING (model, layer, head, token_index)
            WHERE a.ablation = 'resample' AND a.sample = 0)
        SELECT model, layer, count(DISTINCT head) AS n_heads, count(*) AS n_tokens,
               avg(de) AS de, avg(d_logit) AS d_logit, avg(sr) AS sr, avg(sr_ln) AS sr_ln
        FROM facts GROUP BY model, layer ORDER BY layer""")
    assert [row[:4] for row in printed] == [["tiny-gpt2", str(r["layer"]), "4", "8"] for r in want.iter_rows(named=True)]
    got = np.array([[float(x) for x in row[4:8]] for row in printed])
    # The table prints six significant digits.
    np.testing.assert_allclose(got, want.select("de", "d_logit", "sr", "sr_ln").to_numpy(), rtol=1e-5, atol=0)
    assert np.abs(got).min() > 0
    ci = np.array([[float(x) for x in row[8:]] for row in printed])  # sr's interval brackets sr
    assert (ci[:, 0] <= got[:, 2] * (1 + 1e-5) + 1e-12).all() and (got[:, 2] <= ci[:, 1] + 1e-12).all()


def _err(res) -> str:
    lines = [l for l in res.output.splitlines() if l.startswith("Error")]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output
    return lines[0]


CASES = [
    (["--model", "pythia-41m"], 1, "Error: unknown model 'pythia-41m'; did you mean pythia-410m"),
    (["--model", "EleutherAI/pythia-14m"], 1,
     "Error: weights for EleutherAI/pythia-14m are not available locally and the Hugging Face hub cannot be reached"),
    (["--tokens", "0"], 1, "Error: tokens: must be positive, got 0"),
    (["--tokens", "-5"], 1, "Error: tokens: must be positive, got -5"),
    (["--top-p", "0"], 1, "Error: top_p: must be in (0, 1], got 0.0"),
    (["--top-p", "1.5"], 1, "Error: top_p: must be in (0, 1], got 1.5"),
    (["--ablations", "resample,swap"], 2, "Error: Invalid value for '--ablations': unknown ablation type 'swap'"),
    (["--heads", "L1X2"], 2, "Error: Invalid value for '--heads': cannot parse 'L1X2'"),
    (["--heads", "L9H0"], 1, "Error: --heads: L9H0 is out of range; the model has layers 0..1"),
    (["--heads", "L1H7"], 1, "Error: --heads: L1H7 is out of range; the model has heads 0..3"),
    (["--corpus", "/nonexistent/corpus.txt"], 1, "Error: corpus '/nonexistent/corpus.txt' not found"),
]


@pytest.mark.parametrize("extra,code,line", CASES)
def test_bad_input_gets_one_line_and_leaves_store_alone(cli_store, tiny_model_dirs, extra, code, line):
    before = _snapshot(cli_store)
    args = ["ingest", "--model", str(tiny_model_dirs["gpt2"]), "--store", str(cli_store), "--tokens", "124",
            "--seq-len", "32", "--batch-size", "2", "--corpus", "embedded", "--ablations", "resample,zero"]
    res = CliRunner().invoke(main, args + extra)
    assert res.exit_code == code, res.output
    assert _err(res).startswith(line), res.output
    assert _snapshot(cli_store) == before


UNIT_CASES = [
    (["--units", "MLP99"], 1, "Error: --units: MLP99 is out of range; the model has layers 0..1"),
    (["--units", "L1H40"], 1, "Error: --units: L1H40 is out of range; the model has heads 0..3"),
    (["--units", "L1H1+"], 2, "Error: Invalid value for '--units': group 'L1H1+' has an empty member"),
    (["--units", "L1H1+L1H1"], 2, "Error: Invalid value for '--units': group 'L1H1+L1H1' names L1H1 twice"),
    (["--units", "b=L0H1+L1H1,b=L0H2+L1H2"], 2, "Error: Invalid value for '--units': the name 'b' is used twice"),
    (["--units", "mlp1=L0H1+L1H1"], 2, "Error: Invalid value for '--units': the name 'mlp1' is also a label"),
    (["--units", "L0H1,L1H1", "--given", "L1H1+L1H2"], 1, "Error: --given L1H1+L1H2: the condition overlaps the unit L1H1"),
    (["--units", "BLOCK1", "--given", "MLP1"], 1, "Error: --given MLP1: the condition overlaps the unit BLOCK1"),
    (["--given", "L1H1,L1H2"], 2, "Error: Invalid value for '--given': --given takes one unit"),
]


@pytest.mark.parametrize("extra,code,line", UNIT_CASES)
def test_bad_units_get_one_line_before_the_model_loads(cli_store, tiny_model_dirs, monkeypatch, extra, code, line):
    from selfrepair.ingest import models

    def no_load(*a, **k):
        raise AssertionError("the model loaded before the units were checked")

    monkeypatch.setattr(models, "load_model", no_load)
    before = _snapshot(cli_store)
    args = ["ingest", "--model", str(tiny_model_dirs["gpt2"]), "--store", str(cli_store), "--tokens", "124",
            "--seq-len", "32", "--batch-size", "2", "--corpus", "embedded"]
    res = CliRunner().invoke(main, args + extra)
    assert res.exit_code == code, res.output
    assert _err(res).startswith(line), res.output
    assert _snapshot(cli_store) == before


def test_empty_and_short_corpus(tiny_model_dirs, tmp_path):
    empty, short = tmp_path / "empty.txt", tmp_path / "short.txt"
    empty.write_text("")
    short.write_text("tiny")
    base = ["ingest", "--model", str(tiny_model_dirs["gpt2"]), "--store", str(tmp_path / "s"), "--seq-len", "32"]
    res = CliRunner().invoke(main, base + ["--corpus", str(empty)])
    assert res.exit_code == 1 and _err(res) == f"Error: corpus {empty}: empty (no text to tokenise)"
    res = CliRunner().invoke(main, base + ["--corpus", str(short)])
    assert res.exit_code == 1
    assert _err(res) == f"Error: corpus {short}: 5 tokens is shorter than one row (31 tokens after BOS)"


def test_seq_len_above_the_context(tiny_model_dirs, tmp_path):
    res = CliRunner().invoke(main, ["ingest", "--model", str(tiny_model_dirs["gpt2"]), "--store", str(tmp_path / "s"),
                                    "--seq-len", "100", "--corpus", "embedded"])
    assert res.exit_code == 1 and _err(res) == "Error: seq_len: 100 is above the model's context of 64 tokens"
    assert not (tmp_path / "s").exists()


def test_store_path_that_is_a_file(tiny_model_dirs, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    res = CliRunner().invoke(main, ["ingest", "--model", str(tiny_model_dirs["gpt2"]), "--store", str(f)])
    assert res.exit_code == 1 and _err(res) == f"Error: store path {f} is a file, not a folder"


def test_different_configuration_refuses_without_overwrite(cli_store, tiny_model_dirs):
    before = _snapshot(cli_store)
    args = ["ingest", "--model", str(tiny_model_dirs["gpt2"]), "--store", str(cli_store), "--tokens", "124",
            "--seq-len", "16", "--batch-size", "2", "--corpus", "embedded", "--ablations", "resample,zero"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1
    assert _err(res).startswith(f"Error: {cli_store / 'tiny-gpt2'} was ingested with a different configuration "
                                "(seq_len: stored 32, asked 16)")
    assert _snapshot(cli_store) == before


def test_every_command_has_help_and_is_in_the_readme():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name, command in main.commands.items():
        res = CliRunner().invoke(main, [name, "--help"])
        assert res.exit_code == 0 and "Example:" in res.output, name
        assert f"selfrepair {name}" in readme, name


def test_store_path_not_writable(tiny_model_dirs):
    # /sys is mounted read-only, so this holds even for root (who bypasses chmod).
    res = CliRunner().invoke(main, ["ingest", "--model", str(tiny_model_dirs["gpt2"]), "--store", "/sys/selfrepair-test"])
    assert res.exit_code == 1 and _err(res) == "Error: store path /sys/selfrepair-test is not writable"


def test_verify_reports_ok_and_damage(cli_store, tmp_path):
    import shutil

    res = CliRunner().invoke(main, ["verify", "--store", str(cli_store)])
    assert res.exit_code == 0 and res.output.startswith("tiny-gpt2: OK"), res.output
    broken = tmp_path / "broken"
    shutil.copytree(cli_store, broken)
    parquet = sorted((broken / "tiny-gpt2" / "tables" / "head_effects").glob("*.parquet"))[0]
    data = bytearray(parquet.read_bytes())
    data[64] ^= 0xFF  # one flipped byte
    parquet.write_bytes(bytes(data))
    chunk = sorted((broken / "tiny-gpt2" / "activations.zarr" / "resid_pre" / "c").glob("*/0/0"))[0]
    chunk.write_bytes(chunk.read_bytes()[:10])  # truncated
    gone = sorted((broken / "tiny-gpt2" / "tables" / "repair_sources").glob("*.parquet"))[0]
    gone.unlink()
    res = CliRunner().invoke(main, ["verify", "--store", str(broken)])
    assert res.exit_code == 1
    out = res.output
    assert f"FAIL shard clean-00000000-00000002: {parquet.relative_to(broken / 'tiny-gpt2')} checksum mismatch" in out
    assert f"{chunk.relative_to(broken / 'tiny-gpt2')} checksum mismatch" in out
    assert "activations.zarr/resid_pre: cannot be read" in out
    assert f"{gone.relative_to(broken / 'tiny-gpt2')} is missing" in out
    assert out.strip().splitlines()[-1] == f"Error: verify found 4 problem(s) in {broken}"


# A --revision is no longer a conflicting setting of the same folder (issue 22): a revision is its own
# model (folder NAME@REV), and a local folder has none (tests/ingest/test_revisions.py).
@pytest.mark.parametrize("extra,problem", [
    (["--seed", "3"], "seed: stored 0, asked 3"),
    (["--top-p", "0.1"], "top_p: stored 0.02, asked 0.1"),
    (["--corpus", "{corpus}"], "corpus: stored 'embedded', asked '{corpus}'"),
])
def test_other_conflicting_settings(cli_store, tiny_model_dirs, tmp_path, extra, problem):
    corpus = tmp_path / "other.txt"
    corpus.write_text("a different corpus, long enough to fill a few rows of tokens. " * 20)
    extra = [e.format(corpus=corpus) for e in extra]
    before = _snapshot(cli_store)
    args = ["ingest", "--model", str(tiny_model_dirs["gpt2"]), "--store", str(cli_store), "--tokens", "124",
            "--seq-len", "32", "--batch-size", "2", "--corpus", "embedded", "--ablations", "resample,zero"]
    res = CliRunner().invoke(main, args + extra)
    assert res.exit_code == 1
    assert f"({problem.format(corpus=corpus)})" in _err(res)
    assert _snapshot(cli_store) == before


# -- issue 22: no silent no-op, the plan before the load, a dry run without the weights ---------------
NO_OP_CASES = [
    (["--heads", "L1", "--sr-mlps-neurons", "penultimate"], 1,
     "Error: sr_mlps_neurons: --sr-mlps-neurons penultimate names layer 0's heads (n_layers − 2), but none of them "
     "is ablated (the ablated heads are in layers 1), so it would add no neuron detail; add them to --units/--heads "
     "(e.g. --heads L0) or name ablated heads"),
    (["--units", "mlps", "--sr-mlps-neurons", "all"], 1,
     "Error: sr_mlps_neurons: --sr-mlps-neurons all names L0H0, L0H1, L0H2, … (8), but no head is ablated"),
    (["--ablations", "zero", "--resamples", "2"], 1,
     "Error: resamples: 2 draws asked, but resample is not among the ablations (zero): the draws would do nothing"),
    (["--engine", "reference", "--dtype", "bfloat16"], 2,
     "Error: --dtype bfloat16 does nothing with --engine reference (its hooked forwards run in float32)"),
    (["--heads", "L1", "--given", "ATTN1"], 1,
     "Error: --given ATTN1: every unit (L1) overlaps the condition, so nothing would be ablated on top of it"),
]


def _no_load(monkeypatch):
    from selfrepair.ingest import models

    def no_load(*a, **k):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(models, "load_model", no_load)


@pytest.mark.parametrize("extra,code,line", NO_OP_CASES)
def test_an_option_that_would_do_nothing_is_refused_before_the_model_loads(tiny_model_dirs, tmp_path, monkeypatch,
                                                                           extra, code, line):
    _no_load(monkeypatch)
    args = ["ingest", "--model", str(tiny_model_dirs["gpt2"]), "--store", str(tmp_path / "s"), "--tokens", "124",
            "--seq-len", "32", "--batch-size", "2", "--corpus", "embedded"]
    res = CliRunner().invoke(main, args + extra)
    assert res.exit_code == code, res.output
    assert _err(res).startswith(line), res.output
    assert not (tmp_path / "s").exists()


def test_dry_run_reads_the_config_not_the_weights(tiny_model_dirs, tmp_path, monkeypatch):
    # The plan, a note on named heads left without detail, and the estimate: all before any load.
    _no_load(monkeypatch)
    res = CliRunner().invoke(main, ["ingest", "--model", str(tiny_model_dirs["llama"]), "--store", str(tmp_path / "s"),
                                    "--tokens", "124", "--seq-len", "32", "--batch-size", "2", "--corpus", "embedded",
                                    "--heads", "L1", "--sr-mlps-neurons", "all", "--dry-run"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == ("note: --sr-mlps-neurons all: 4 of its 8 heads are not ablated (L0H0, L0H1, L0H2, L0H3), "
                        "so only the other 4 get neuron detail by sr_mlps")
    assert lines[1].startswith("selfrepair ingest: tiny-llama (") and ", Llama) — 2 layers × 4 heads, d_model 32" in lines[1]
    assert "on 4 heads: 496 unit-token ablations" in res.output
    assert "and on each of 4 ablated heads' top 2 tokens by sr_mlps (--sr-mlps-neurons all)" in res.output
    assert lines[-1].split()[0] == "total" and not (tmp_path / "s").exists()


def test_the_plan_prints_before_the_load_and_the_self_check_shows_progress(cli_store, tiny_model_dirs):
    res = CliRunner().invoke(main, ["ingest", "--model", str(tiny_model_dirs["gpt2"]), "--store", str(cli_store),
                                    "--tokens", "124", "--seq-len", "32", "--batch-size", "2",
                                    "--corpus", "embedded", "--ablations", "resample,zero"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    order = [next(i for i, line in enumerate(lines) if line.startswith(start)) for start in (
        "selfrepair ingest: tiny-gpt2", "loading tiny-gpt2", "loaded tiny-gpt2 in ", "self-check: 3 steps to do",
        "self-check: done, 3 steps in ", "self-check on 1 row of the first batch: ", "clean pass: ", "ablation sweep: ")]
    assert order == sorted(order), lines
    assert sum(line.startswith("selfrepair ingest: ") for line in lines) == 1  # the config told the loaded shape
    assert "\r" not in res.output  # lines, not a bar redrawn in place
