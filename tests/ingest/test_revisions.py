"""Training checkpoints as their own models (issue 22): `ingest --revision REV` -> folder NAME@REV.

Offline, no hub revision can be loaded here. What is real:
- the naming (`resolve`), and the refusals before any load: a local folder has no revisions; a hub
  revision that is neither cached nor reachable (the suite runs with HF_HUB_OFFLINE=1). The hub's own
  "revision does not exist" answer (RevisionNotFoundError) is not exercised: it needs the network.
- two revisions of one model, made real by ingesting the same tiny model folder twice under
  `--model-name tiny-gpt2@step1` and `tiny-gpt2@step20` (a local checkpoint labelled as a revision):
  the manifests record the revisions and the report's training-step figure draws them.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import tiny_models
from selfrepair.analysis.context import Context, ModelInfo
from selfrepair.analysis.fig_training_steps import FIGURE, revision_groups, step_of
from selfrepair.analysis import registry
from selfrepair.analysis.report import figure_entries
from selfrepair.analysis.spec import fetch
from selfrepair.cli import main
from selfrepair.ingest import models as M
from selfrepair.ingest import runner
from selfrepair.queries.store import Store
from selfrepair.store.model_store import model_dirname

REVISIONS = ("step20", "step1")  # ingested out of order: the figure orders them by step


@pytest.fixture(scope="module")
def revision_store(tiny_stores, tmp_path_factory):
    """One store root with the tiny GPT-2 ingested twice, labelled as two revisions."""
    root = tmp_path_factory.mktemp("revisions")
    for rev in REVISIONS:
        tiny_stores.copy("gpt2", root, **tiny_models.SMALL_STORE, model_name=f"tiny-gpt2@{rev}")
    return root


def test_revision_names():
    spec = M.resolve("pythia-160m", "step1000")
    assert (spec.name, spec.hf_id, spec.revision) == ("pythia-160m@step1000", "EleutherAI/pythia-160m", "step1000")
    assert model_dirname(M.resolve("EleutherAI/pythia-160m", "step3000").name) == "EleutherAI--pythia-160m@step3000"
    assert M.resolve("pythia-160m", "step1", model_name="p160").name == "p160@step1"
    assert M.resolve("pythia-160m").revision is None
    assert step_of("step143000") == 143000 and step_of("main") is None


@pytest.fixture
def no_load(monkeypatch):
    """Fail on any model load: every refusal here comes before it."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(runner.M, "load_model", refuse)


def _ingest(args, store):
    return CliRunner().invoke(main, ["ingest", *args, "--store", str(store), "--quiet"])


def test_local_folder_has_no_revisions(tiny_model_dirs, tmp_path, no_load):
    folder = tiny_model_dirs["gpt2"]
    r = _ingest(["--model", str(folder), "--revision", "step1"], tmp_path / "s")
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output == (f"Error: --revision step1: the local folder {folder} has no revisions (a revision is a branch, "
                        "tag or commit of a Hugging Face hub model, e.g. --model EleutherAI/pythia-160m --revision "
                        "step1000); to store a local checkpoint as a revision, name it --model-name NAME@REV\n")
    assert not (tmp_path / "s").exists()


def test_hub_revision_not_available(tmp_path, no_load, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # whatever this machine has cached
    r = _ingest(["--model", "EleutherAI/pythia-160m", "--revision", "step999999"], tmp_path / "s")
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("Error: revision 'step999999' of EleutherAI/pythia-160m is not in the local Hugging "
                               "Face cache and the hub cannot be reached")


@pytest.mark.parametrize("args,message", [
    # a value click's option type refuses: click's usage lines, then the one Error: line
    (["--revision", "a b"], "Error: Invalid value for '--revision': 'a b' is not a revision: a branch, tag or commit, "
                            "without '@' or spaces"),
    (["--model-name", "x@1@2"], "Error: Invalid value for '--model-name': 'x@1@2' cannot name a model folder"),
    (["--model", "pythia-160m", "--revision", "step1", "--model-name", "p@1"],
     "Error: --model-name p@1: with --revision the name takes no '@' (the folder is NAME@step1)"),
])
def test_bad_revision_settings(args, message, tmp_path, no_load):
    r = _ingest(args, tmp_path / "s")
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert r.exit_code != 0 and len(errors) == 1 and errors[0].startswith(message), r.output
    assert "Traceback" not in r.output


def test_revisions_stored_as_models(revision_store):
    with Store.open(revision_store) as s:
        assert s.models == ["tiny-gpt2@step1", "tiny-gpt2@step20"]
        assert [s.manifest(m).model.revision for m in s.models] == ["step1", "step20"]
    raw = json.loads((revision_store / "tiny-gpt2@step1" / "manifest.json").read_text())
    assert raw["model"]["name"] == "tiny-gpt2@step1" and raw["model"]["revision"] == "step1"
    assert raw["config"]["model_name"] == "tiny-gpt2@step1"


def test_training_step_figure(revision_store):
    with Store.open(revision_store) as s:
        infos = tuple(ModelInfo.from_manifest(m, s.manifest(m)) for m in s.models)
        ctx = Context(models=infos, ablation="zero", p=infos[0].top_p)
        assert [m.revision for m in revision_groups(infos)["tiny-gpt2"]] == ["step1", "step20"]
        assert FIGURE.shown(ctx) and FIGURE in registry.FIGURES
        # one revision alone: no figure, no note
        assert figure_entries(FIGURE, Context(models=infos[:1], ablation="zero", p=ctx.p), {}, s.query) == []
        df = fetch(s.query, FIGURE.query, FIGURE.runs(ctx), ctx.names)
        want = s.query("fig_training_steps", p=ctx.p, ablation="zero", sample=0)
    fig = FIGURE.plot(df, ctx)  # the report's figure_entries renders it as PNG and PDF too
    assert fig.selfrepair_data.select(want.columns).equals(want)
    assert want["model"].to_list() == ["tiny-gpt2@step1", "tiny-gpt2@step20"]
    # the same model folder twice: the two revisions' numbers are the same
    assert want["sr"][0] == pytest.approx(want["sr"][1], rel=1e-6)
    assert "tiny-gpt2@step1, tiny-gpt2@step20" in fig.selfrepair_caption
    (line,) = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "self-repair"]
    assert list(line.get_xdata()) == [1, 20]


def test_compare_two_revisions(revision_store):
    r = CliRunner().invoke(main, ["compare", "tiny-gpt2@step1", "tiny-gpt2@step20", "--store", str(revision_store),
                                  "--ablation", "zero", "--quantity", "sr", "-f", "csv"])
    assert r.exit_code == 0, r.output
    assert f"tiny-gpt2@step1: tiny-gpt2@step1 in {revision_store}, revision step1 (2 layers × 4 heads" in r.stderr
    assert r.stdout.splitlines()[0] == "layer,quantity,tiny-gpt2@step1,tiny-gpt2@step20,diff"
