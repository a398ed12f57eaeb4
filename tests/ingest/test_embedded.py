"""The embedded SmolLM2-135M is a real model: its loss on the embedded corpus is far below chance,
its stored numbers equal the Hugging Face model's own, and both identities hold to 1e-4."""

import math

import numpy as np
import pytest
import torch

from engine_compare import KEY, VALUES, close as _close
from selfrepair import Store
from selfrepair.ingest.config import IngestConfig
from selfrepair.ingest.models import load_model
from selfrepair.ingest.runner import Ingest

pytestmark = [pytest.mark.slow, pytest.mark.embedded]  # the embedded SmolLM2-135M

TOL = 1e-4  # the float32 errors measured here are about 2e-5


def test_embedded_model_predicts_real_text(tmp_path):
    Ingest(IngestConfig(store=tmp_path, tokens=254, seq_len=128, batch_size=2, heads="L29H0",
                        quiet=True, activations=False, neurons_top_k=0)).run()
    store = Store.open(tmp_path)
    manifest = store.manifest("smollm2-135m")
    assert manifest.model.n_layers == 30 and manifest.model.n_heads == 9
    assert manifest.model.raw["norm"] == "RMS"
    tokens = store.sql("SELECT * FROM tokens ORDER BY token_index")
    assert tokens.height == 254
    uniform = math.log(manifest.model.d_vocab)  # 10.8 nats for 49152 tokens
    assert tokens["loss"].mean() < 0.5 * uniform

    # The Hugging Face model itself, on the stored rows: its logits centred over the
    # vocabulary are what the store calls logit, and its cross-entropy is the loss.
    # (the test model cache hands out a copy of the ingest's load: the Hugging Face module untouched)
    hf = load_model("smollm2-135m", "cpu").hf_model
    ids = tokens["token_id"].to_numpy().reshape(2, 127)
    rows = torch.from_numpy(np.concatenate([ids, tokens["next_token_id"].to_numpy().reshape(2, 127)[:, -1:]], 1))
    with torch.no_grad():
        logits = hf(rows.long()).logits[:, :-1].double()  # [row, pos, d_vocab]
    y = rows[:, 1:].long()
    centred = (logits - logits.mean(-1, keepdim=True)).gather(-1, y[..., None])[..., 0].reshape(-1).numpy()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
    np.testing.assert_allclose(tokens["logit"].to_numpy(), centred, rtol=0, atol=TOL)
    np.testing.assert_allclose(tokens["loss"].to_numpy(), loss.numpy(), rtol=0, atol=TOL)

    assert store.query("check_de_identity")["max_abs_error"][0] < TOL
    ln = store.query("check_ln_identity")
    assert ln.height == 1 and ln["n_rows"][0] == 254 and ln["max_abs_error"][0] < TOL


# Here, not in test_engines.py: one pytest process loads the embedded model once for both tests.
def test_fast_engine_equals_reference_on_embedded_model(tmp_path):
    stores = {}
    for engine in ("fast", "reference"):
        stores[engine] = tmp_path / engine
        Ingest(IngestConfig(store=stores[engine], tokens=62, seq_len=32, batch_size=1, heads="L3H1,L15H4,L29H8",
                            engine=engine, quiet=True, neurons_top_k=0, activations=False)).run()
    a = Store.open(stores["fast"]).sql("SELECT * FROM ablation_effects").sort(KEY)
    b = Store.open(stores["reference"]).sql("SELECT * FROM ablation_effects").sort(KEY)
    assert a.height == b.height == 3 * 62
    for col in VALUES:
        _close(a[col], b[col], col)


def test_dequantised_copy_equals_the_gguf_file():
    """The float32 copy later loads read (ingest/gguf_cache.py) holds exactly what the GGUF file's
    quantised blocks decode to, by the `gguf` package's own decoder; the model loads from it."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    from selfrepair.ingest import gguf_cache
    from selfrepair.ingest.models import _GGUF_FILE, embedded_model_dir

    load_model("smollm2-135m", "cpu")  # the suite's first load of the embedded model writes the copy
    gguf = embedded_model_dir() / _GGUF_FILE
    folder = gguf_cache.cached(gguf)
    assert folder is not None
    saved = load_file(folder / "model.safetensors")
    blocks = {t.name: t for t in GGUFReader(gguf).tensors}
    for name, key in [("token_embd.weight", "model.embed_tokens.weight"),
                      ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                      ("blk.29.ffn_up.weight", "model.layers.29.mlp.up_proj.weight"),
                      ("blk.7.attn_output.weight", "model.layers.7.self_attn.o_proj.weight")]:
        t = blocks[name]
        expected = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
        assert torch.equal(saved[key], expected), name


def test_dequantised_copy_round_trip_and_unwritable_cache(tmp_path, monkeypatch):
    """save then cached gives a folder transformers loads to the same tensors; a cache root that
    cannot be written is no error (None: the load reads the GGUF file as before)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfrepair.ingest import gguf_cache

    hf = load_model("smollm2-135m", "cpu")
    source = tmp_path / "model.gguf"
    source.write_bytes(b"stands for the GGUF file: the copy is keyed by its path, size and time")
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path / "cache"))
    assert gguf_cache.cached(source) is None
    folder = gguf_cache.save(hf.hf_model, hf.tokenizer, source)
    assert folder == gguf_cache.cached(source) and folder.parent.parent == tmp_path / "cache"
    again = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    before, after = hf.hf_model.state_dict(), again.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert AutoTokenizer.from_pretrained(folder)("def f(x):\n  return x").input_ids == \
        hf.tokenizer("def f(x):\n  return x").input_ids
    source.write_bytes(b"a changed file is a different copy")
    assert gguf_cache.cached(source) is None

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(blocked))
    assert gguf_cache.save(hf.hf_model, hf.tokenizer, source) is None
