"""Model loading fails with one typed error and one `Error:` line, never a traceback."""

import pytest
import transformers
from click.testing import CliRunner

from selfrepair.cli import main
from selfrepair.errors import ModelNotFound
from selfrepair.ingest import models
from selfrepair.ingest.synthetic import byte_tokenizer

HUB_ID = "EleutherAI/pythia-14m"


def _fail(*args, **kwargs):
    raise OSError("404 Client Error: Not Found for url: https://huggingface.co/EleutherAI/pythia-14m")


@pytest.fixture
def hub_up_but_failing(monkeypatch):
    """The hub answers, but every download fails (the case that left `model` unbound)."""
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", _fail)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _fail)
    return monkeypatch


def test_failed_hub_download_is_model_not_found(hub_up_but_failing):
    with pytest.raises(ModelNotFound, match=rf"^cannot download {HUB_ID} from the Hugging Face hub: 404 Client Error"):
        models.load_hf(models.resolve(HUB_ID), None)


def test_failed_weights_after_tokenizer_is_model_not_found(hub_up_but_failing):
    hub_up_but_failing.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: byte_tokenizer())
    with pytest.raises(ModelNotFound, match=rf"^cannot download {HUB_ID} from the Hugging Face hub: 404 Client Error"):
        models.load_hf(models.resolve(HUB_ID), None)


def test_error_without_message_still_names_its_kind(hub_up_but_failing):
    def bare(*args, **kwargs):
        raise RuntimeError()

    hub_up_but_failing.setattr(transformers.AutoModelForCausalLM, "from_pretrained", bare)
    hub_up_but_failing.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: byte_tokenizer())
    with pytest.raises(ModelNotFound, match=rf"^cannot download {HUB_ID} from the Hugging Face hub: RuntimeError$"):
        models.load_hf(models.resolve(HUB_ID), None)


def test_cli_prints_one_error_line_and_leaves_no_folder(hub_up_but_failing, tmp_path):
    store = tmp_path / "s"
    res = CliRunner().invoke(main, ["ingest", "--model", HUB_ID, "--store", str(store), "--tokens", "62",
                                    "--seq-len", "32", "--corpus", "embedded"])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and not isinstance(res.exception, UnboundLocalError)
    errors = [line for line in res.output.splitlines() if line.startswith("Error")]
    assert errors == [f"Error: cannot download {HUB_ID} from the Hugging Face hub: 404 Client Error: Not Found "
                      f"for url: https://huggingface.co/{HUB_ID}"]
    assert not store.exists() or not any(store.iterdir())


def test_local_folder_that_fails_to_load(tiny_model_dirs, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("size mismatch for transformer.h.0.attn.c_attn.weight\nmore detail")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", broken)
    folder = tiny_model_dirs["gpt2"]
    with pytest.raises(ModelNotFound, match=rf"^cannot load model from {folder}: size mismatch for "
                                            r"transformer\.h\.0\.attn\.c_attn\.weight$"):
        models.load_hf(models.resolve(str(folder)), None)
