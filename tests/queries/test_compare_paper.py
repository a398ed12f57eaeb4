"""`selfrepair compare-paper` on synthetic stores built to match the paper's reference, or to miss it.

The matching store is a 12 × 12 `pythia-160m` of N = 100 tokens (top 2%: 2 tokens per
head). Each head's two top tokens carry the paper's top2pct means exactly, and the other 98
carry the value that makes the all-token mean the paper's all_tokens mean (always a lower
clean DE, so the top set is those two). The ablation columns follow the views' definitions:
de = DE_ablated, d_logit = delta_logit, d_de_heads = SR_from_heads, d_de_mlps = SR_from_MLPs,
so sr = d_logit - (de_ablated - de_clean) and sr_ln = sr - heads - MLPs are the paper's.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from click.testing import CliRunner

from selfrepair.errors import ConfigError
from selfrepair.queries import compare_paper
from selfrepair.store.manifest import ModelFacts
from selfrepair.queries.compare_paper import QUANTITIES, REFERENCE_CSV, compare, load_reference, paper_model
from selfrepair.store.model_store import ModelStore
from selfrepair.store.schema import METRIC_COLUMNS, TABLES, validate_table
from selfrepair.store.writer import commit_shard, write_manifest

N_TOKENS, SEQ_LEN, TOP_P = 100, 10, 0.02
K = math.floor(TOP_P * N_TOKENS)
OFF = {(3, 5): 0.2, (11, 0): -0.3}  # head -> shift of its top tokens' ablated-head repair (d_de_heads)
# Store column each quantity is built from (sr and sr_ln follow from these in the views).
BUILT_FROM = {"de_clean": "DE_clean", "de": "DE_ablated", "d_logit": "delta_logit", "d_de_heads": "SR_from_heads",
              "d_de_mlps": "SR_from_MLPs"}


def _table(name: str, cols: dict) -> pa.Table:
    """The rows as a store without output metrics holds them (the paper's numbers have none)."""
    return validate_table(TABLES[name], pa.table({k: v for k, v in cols.items() if k not in METRIC_COLUMNS.get(name, ())}))


def write_paper_store(path: Path, paper: str = "pythia-160m", shift: dict | None = None,
                      ablation: str = "resample", unablated: tuple = (), hf_id: str | None = None) -> None:
    """One model folder whose top-2% (and all-token) head means are the reference's for `paper`
    (`shift`: head -> added to its top tokens' d_de_heads; `unablated`: heads with no ablation rows;
    `hf_id`: the manifest's model id, default the paper model's; the manifest's name is the folder's)."""
    ref = load_reference()
    top = ref.filter((pl.col("token_selection") == "top2pct") & (pl.col("model") == paper)).sort("layer", "head")
    every = ref.filter((pl.col("token_selection") == "all_tokens") & (pl.col("model") == paper)).sort("layer", "head")
    n_layers, n_heads = int(top["n_layers"][0]), int(top["head"].max()) + 1
    ms = ModelStore(path)
    path.mkdir(parents=True)
    write_manifest(ms, {
        "model": {"name": path.name, "hf_id": hf_id or f"EleutherAI/{paper}", "n_layers": n_layers, "n_heads": n_heads,
                  "d_model": 16, "d_mlp": 8},
        "n_tokens": N_TOKENS, "n_rows": N_TOKENS // SEQ_LEN, "seq_len": SEQ_LEN, "config": {"top_p": TOP_P},
        "ablations": [ablation], "resample": {"samples": 1}, "shards": {},
    })
    t = np.arange(N_TOKENS)
    tokens = {"token_index": t, "row": t // SEQ_LEN, "pos": t % SEQ_LEN, "token_id": t % 50,
              "next_token_id": (t + 1) % 50, "token_str": [f"t{i}" for i in t],
              "next_token_str": [f"t{i + 1}" for i in t], "logit": np.ones(N_TOKENS), "ln_scale": np.ones(N_TOKENS),
              "unembed_bias": np.zeros(N_TOKENS), "loss": np.ones(N_TOKENS), "de_other": np.zeros(N_TOKENS)}
    heads = {c: [] for c in ("layer", "head", "token_index", "de")}
    abl = {c: [] for c in TABLES["ablation_effects"].column_names}
    for i, row in enumerate(top.iter_rows(named=True)):
        layer, head = row["layer"], row["head"]
        first = (layer * n_heads + head) % N_TOKENS
        is_top = np.isin(t, [first, (first + 37) % N_TOKENS])  # two top tokens, spread over the rows
        cols = {}
        for col, paper_col in BUILT_FROM.items():
            value = row[paper_col] + (shift or {}).get((layer, head), 0.0) * (col == "d_de_heads")
            # The other tokens' value makes the all-token mean the paper's (or one logit lower).
            mean = every[paper_col][i] if every.height else row[paper_col] - 1.0
            cols[col] = np.where(is_top, value, (N_TOKENS * mean - K * row[paper_col]) / (N_TOKENS - K))
        de_clean = cols.pop("de_clean")
        heads["de"] += de_clean.tolist()
        heads["layer"] += [layer] * N_TOKENS
        heads["head"] += [head] * N_TOKENS
        heads["token_index"] += t.tolist()
        if (layer, head) in unablated:
            continue
        abl["token_index"] += t.tolist()
        abl["ln_scale"] += [1.0] * N_TOKENS
        for key, value in (("layer", layer), ("head", head), ("ablation", ablation), ("sample", 0), ("condition", ""),
                           ("unit", f"L{layer}H{head}"), ("unit_kind", "head")):
            abl[key] += [value] * N_TOKENS
        abl["de_base"] += de_clean.tolist()
        for col, values in cols.items():
            abl[col] += values.tolist()
    entries = ms.write_shard_files("clean-0000", {"tokens": _table("tokens", tokens),
                                                  "head_effects": _table("head_effects", heads)})
    commit_shard(ms, "clean-0000", {"phase": "clean", "rows": [0, N_TOKENS // SEQ_LEN], "files": entries})
    entries = ms.write_shard_files("ablation-0000", {"ablation_effects": _table("ablation_effects", abl)})
    commit_shard(ms, "ablation-0000", {"phase": "ablation", "rows": [0, N_TOKENS // SEQ_LEN], "files": entries,
                                      "ablation": ablation, "sample": 0, "heads": "all"})


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("paper")
    out = {name: root / name for name in ("match", "off", "zero", "mixed", "partial", "shape")}
    write_paper_store(out["match"] / "pythia-160m")
    write_paper_store(out["off"] / "pythia-160m", shift=OFF)
    write_paper_store(out["zero"] / "pythia-160m", ablation="zero")
    write_paper_store(out["mixed"] / "pythia-160m")
    write_paper_store(out["mixed"] / "tiny-x", hf_id="someone/tiny-x")
    write_paper_store(out["partial"] / "pythia-160m", unablated=((2, 7),))
    # pythia-160m's 12 × 12 heads under gpt2-medium's name
    write_paper_store(out["shape"] / "gpt2-medium", hf_id="openai-community/gpt2-medium")
    return out


@pytest.fixture()
def run(cli):
    def invoke(store: Path, *args):
        return CliRunner().invoke(cli, ["compare-paper", "--store", str(store), *args])

    return invoke


def _compare(store: Path, **kwargs):
    from selfrepair.queries.store import Store

    with Store.open(store) as s:
        return compare(s, **kwargs)


def test_matching_store_agrees_to_float32_precision(stores):
    result = _compare(stores["match"])
    assert result.agrees and result.heads.is_empty()
    layers = result.layers
    assert layers.height == 2 * 12 * len(QUANTITIES)  # top2pct and all_tokens, 12 layers, 7 quantities
    assert set(layers["tokens"]) == {"top2pct", "all_tokens"}
    assert layers["agrees"].all()
    # The paper's own rounding (6 significant digits) bounds sr and sr_ln; the rest is float32.
    assert layers["diff"].abs().max() < 2e-4


def test_layer_means_are_the_paper_heads_means(stores):
    ref = load_reference().filter(pl.col("model") == "pythia-160m")
    expected = ref.group_by("token_selection", "layer").agg(pl.col("delta_logit").mean())
    got = _compare(stores["match"]).layers.filter(pl.col("quantity") == "delta_logit")
    joined = got.join(expected, left_on=["tokens", "layer"], right_on=["token_selection", "layer"])
    assert joined.height == 24
    assert np.allclose(joined["paper"], joined["delta_logit"], rtol=0, atol=1e-12)


def test_cli_agrees_exit_0(run, stores):
    r = run(stores["match"], "--model", "pythia-160m")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == f"reference: {REFERENCE_CSV}; tolerance 0.05 logits"
    assert ("pythia-160m (the paper's pythia-160m): resample draw 0; the store has 100 tokens (10 rows of 10; "
            "top 2%: 2 tokens per head), the paper ~1 M tokens in rows of 128") in lines
    assert any("selfrepair ingest --preset paper" in line for line in lines)
    assert "every head agrees within 0.05 logits" in lines
    assert "model        tokens      layer  quantity     store     paper  diff  agrees".split() == \
        lines[lines.index("Per layer: mean over the layer's heads (store, paper, store - paper)") + 1].split()
    assert r.output.rstrip().endswith("(0 rows)")


def test_off_heads_listed_exit_1(run, stores):
    r = run(stores["off"])
    assert r.exit_code == 1, r.output
    assert "2 heads disagree by more than 0.05 logits" in r.output
    heads = _compare(stores["off"]).heads
    # Only top2pct: the shift moves the all-token mean by 2% of it (< 0.05).
    assert set(zip(heads["tokens"], heads["head"], heads["quantity"])) == {
        ("top2pct", h, q) for h in ("L3H5", "L11H0") for q in ("SR_heads", "SR_LN")}
    for (layer, head), shift in OFF.items():
        rows = heads.filter(pl.col("head") == f"L{layer}H{head}")
        assert np.allclose(rows["diff"].abs(), abs(shift), atol=2e-4)
        assert np.allclose(rows["store"] - rows["paper"], rows["diff"])
    assert "L3H5" in r.output and "L11H0" in r.output


def test_tolerance_option(run, stores):
    assert run(stores["off"], "--tolerance", "0.5").exit_code == 0
    r = run(stores["off"], "--tolerance", "-1")
    assert (r.exit_code, r.output) == (2, "Error: tolerance -1.0 must be a positive number of logits\n")


def test_json_and_csv(run, stores):
    r = run(stores["off"], "--format", "json")
    assert r.exit_code == 1
    rows = json.loads(r.stdout)
    assert {row["level"] for row in rows} == {"layer", "head"}
    assert sum(row["level"] == "head" for row in rows) == 4
    r = run(stores["match"], "--format", "csv")
    assert r.exit_code == 0
    assert r.stdout.splitlines()[0] == "level,model,tokens,layer,head,quantity,store,paper,diff,agrees"
    assert "every head agrees" in r.stderr


def test_markdown(run, stores):
    r = run(stores["match"], "--format", "markdown")
    assert r.exit_code == 0 and "## Per layer" in r.output and "| model | tokens | layer |" in r.output


def test_multi_model_store(run, stores):
    r = run(stores["mixed"])
    assert r.exit_code == 0, r.output
    assert "skipped tiny-x: not a model of the paper's reference" in r.output
    r = run(stores["mixed"], "--model", "tiny-x")
    assert (r.exit_code, r.output) == (2, "Error: model 'tiny-x' is not in the paper's reference "
                                          "(it has gpt2-medium, gpt2-small, pythia-160m, pythia-410m)\n")
    r = run(stores["mixed"], "--model", "nope")
    assert r.exit_code == 2 and r.output.startswith("Error: no model 'nope' in ")


def test_head_not_stored_is_listed(run, stores):
    result = _compare(stores["partial"])
    assert set(result.heads["head"]) == {"L2H7"} and result.heads["store"].is_null().all()
    assert result.heads.height == 2 * len(QUANTITIES)  # both token sets
    assert result.layers["agrees"].all()  # layer means over the stored heads, on both sides
    assert run(stores["partial"]).exit_code == 1


def test_model_shape_differs(run, stores):
    r = run(stores["shape"])
    assert (r.exit_code, r.output) == (2, "Error: model 'gpt2-medium' has 12 layers × 12 heads; the paper's "
                                          "gpt2-medium has 24 × 16\n")


def test_store_without_resample(run, stores):
    r = run(stores["zero"])
    assert r.exit_code == 2
    assert r.output == ("Error: ablation 'resample' was not ingested; this store has: zero "
                        "(add it with `selfrepair ingest --ablations …`)\n")


def test_bad_reference_files(run, stores, tmp_path):
    missing = tmp_path / "none.csv"
    r = run(stores["match"], "--reference", str(missing))
    assert (r.exit_code, r.output) == (2, f"Error: reference file {missing} not found\n")
    short = tmp_path / "short.csv"
    short.write_text("token_selection,model,layer,head,n_layers,DE_clean\ntop2pct,pythia-160m,0,0,12,0.4\n")
    r = run(stores["match"], "--reference", str(short))
    assert (r.exit_code, r.output) == (2, f"Error: reference file {short} lacks column 'DE_ablated'\n")
    text = tmp_path / "text.csv"
    text.write_text(REFERENCE_CSV.read_text().replace("0.454766", "n/a", 1))
    r = run(stores["match"], "--reference", str(text))
    assert (r.exit_code, r.output) == (2, f"Error: reference file {text}: column 'DE_clean' has empty or "
                                          "non-numeric values\n")


def test_missing_store(run, tmp_path):
    r = run(tmp_path / "nope")
    assert (r.exit_code, r.output) == (2, f"Error: no selfrepair store at {tmp_path / 'nope'}\n")


@pytest.mark.parametrize("folder,info,paper", [
    ("pythia-410m", {}, "pythia-410m"),
    ("EleutherAI--pythia-410m", {"name": "EleutherAI/pythia-410m", "hf_id": "EleutherAI/pythia-410m"}, "pythia-410m"),
    ("gpt2", {"name": "gpt2", "hf_id": "openai-community/gpt2"}, "gpt2-small"),
    ("mine", {"name": "mine", "hf_id": "openai-community/gpt2-medium"}, "gpt2-medium"),
    ("pythia-160m-deduped", {"hf_id": "EleutherAI/pythia-160m-deduped"}, None),
])
def test_paper_model(folder, info, paper):
    facts = ModelFacts(n_layers=1, n_heads=1, name=info.get("name"), hf_id=info.get("hf_id"))
    assert paper_model(folder, facts) == paper


def test_paper_models_agree_with_the_registry():
    from selfrepair.ingest.models import REGISTRY

    for paper, aliases in compare_paper.PAPER_MODELS.items():
        assert REGISTRY[paper] in aliases
        assert all(REGISTRY[a] == REGISTRY[paper] for a in aliases if a in REGISTRY)


def test_reference_is_shipped():
    assert REFERENCE_CSV.is_file() and (REFERENCE_CSV.parent / "README.md").is_file()
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert "reference/*.csv" in pyproject["tool"]["setuptools"]["package-data"]["selfrepair.queries"]
    ref = load_reference()
    assert ref.group_by("token_selection", "model").len().height == 6


def test_any_reference_csv_names_its_own_models(run, stores, tmp_path):
    """A reference of the documented columns naming a model of the store by its folder (issue 22: it was
    refused as "not in the paper's reference")."""
    mine = tmp_path / "mine.csv"
    load_reference().filter(pl.col("model") == "pythia-160m").with_columns(model=pl.lit("tiny-x")).write_csv(mine)
    r = run(stores["mixed"], "--model", "tiny-x", "--reference", str(mine))
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == f"reference: {mine}; tolerance 0.05 logits"
    assert "tiny-x (the reference's tiny-x): resample draw 0; the store has 100 tokens (10 rows of 10)" in lines
    assert not any("--preset paper" in line for line in lines)  # the paper's advice is for the paper's numbers
    # Without --model: the models the file names; the others are skipped and said so.
    result = _compare(stores["mixed"], reference=mine)
    assert result.agrees and set(result.layers["model"]) == {"tiny-x"} and result.layers.height == 2 * 12 * 7
    assert "skipped pythia-160m: not a model of the reference mine.csv" in result.notes
    r = run(stores["mixed"], "--model", "pythia-160m", "--reference", str(mine))
    assert (r.exit_code, r.output) == (2, "Error: model 'pythia-160m' is not in the reference mine.csv (it has tiny-x)\n")


@pytest.mark.parametrize("edit,message", [
    (lambda df: df.drop("SR_from_LN"), " lacks column 'SR_from_LN'"),
    (lambda df: df.with_columns(delta_logit=pl.lit("big")), ": column 'delta_logit' has empty or non-numeric values"),
    (lambda df: df.with_columns(DE_clean=pl.when(pl.col("head") == 3).then(None).otherwise(pl.col("DE_clean"))),
     ": column 'DE_clean' has empty or non-numeric values"),
    (lambda df: df.with_columns(self_repair=pl.lit(float("inf"))), ": column 'self_repair' has empty or non-numeric values"),
    (lambda df: df.with_columns(token_selection=pl.lit("top5pct")),
     ": token_selection 'top5pct' is not one of top2pct, all_tokens"),
    (lambda df: df.with_columns(layer=pl.col("layer") + 0.5), ": column 'layer' must hold whole numbers >= 0"),
    (lambda df: df.with_columns(n_layers=pl.lit(3)), ": model 'tiny-x' has layers outside its n_layers"),
    (lambda df: df.clear(), " has no rows"),
])
def test_bad_custom_reference(tmp_path, edit, message):
    """Each malformed reference is refused by load_reference, in one line (the CLI's one Error: line, below)."""
    bad = tmp_path / "bad.csv"
    edit(load_reference().filter(pl.col("model") == "pythia-160m").with_columns(model=pl.lit("tiny-x"))).write_csv(bad)
    with pytest.raises(ConfigError) as e:
        load_reference(bad)
    assert str(e.value).startswith(f"reference file {bad}{message}") and "\n" not in str(e.value)


def test_bad_custom_reference_cli(run, stores, tmp_path):
    bad = tmp_path / "bad.csv"
    load_reference().with_columns(delta_logit=pl.lit("big")).write_csv(bad)
    r = run(stores["mixed"], "--reference", str(bad))
    assert (r.exit_code, r.output) == (2, f"Error: reference file {bad}: column 'delta_logit' has empty or "
                                          "non-numeric values\n")
