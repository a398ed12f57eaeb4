"""`--preset paper`: the authors' batches, pairing, rows and (for Llama) unfolded weights.

The rows are compared with a small reimplementation of TransformerLens's chunked
`tokenize_and_concatenate` written here (and with TransformerLens's own when the installed
one is that version); the stored numbers of a tiny Llama with a recomputation that uses
plain transformers only, in the authors' convention (no final-norm gain, no centring).
"""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from selfrepair import Store
from selfrepair.cli import main
from selfrepair.errors import ConfigError, CorpusError
from selfrepair.ingest.config import IngestConfig
from selfrepair.ingest.corpus import build_rows, tl_rows
from selfrepair.ingest.pairing import PAPER_RULE, source_rows
from selfrepair.ingest.synthetic import byte_tokenizer

BS, SEQ = 30, 128


# -- pairing and batches ---------------------------------------------------------------------
@pytest.mark.parametrize("n_batches", [2, 3, 5])
@pytest.mark.parametrize("bs", [1, 3, 30])
def test_paper_pairing_takes_the_next_whole_batch(n_batches, bs):
    n = n_batches * bs
    rows = np.arange(n)
    src = source_rows(n, bs, 0, 0, whole_batches=True)
    assert np.array_equal(src // bs, (rows // bs + 1) % n_batches)  # the next batch; the last one's is batch 0
    assert np.array_equal(src % bs, rows % bs)  # the same row of it
    for sample in (1, 2):  # the seeded extra draws never use the row's own batch either
        assert not np.any(source_rows(n, bs, sample, 7, whole_batches=True) // bs == rows // bs)
    # Asked batch by batch (as shards are), the same pairs.
    parts = [source_rows(n, bs, 0, 0, b, b + bs, whole_batches=True) for b in range(0, n, bs)]
    assert np.array_equal(np.concatenate(parts), src)


@pytest.mark.parametrize("n", [3, 4, 7])
def test_paper_pairing_refuses_one_or_partial_batches(n):
    with pytest.raises(ConfigError, match="two whole batches of 3 rows"):
        source_rows(n, 3, 0, 0, whole_batches=True)


def test_paper_config_sets_the_authors_settings_and_drops_a_partial_batch():
    cfg = IngestConfig(preset="paper", tokens=75 * 127)  # 75 rows: two whole batches and 15 rows dropped
    assert (cfg.batch_size, cfg.seq_len, cfg.top_p) == (30, 128, 0.02)
    assert (cfg.n_rows, cfg.n_batches, cfg.n_tokens) == (60, 2, 60 * 127)
    assert cfg.identity()["preset"] == "paper"
    assert IngestConfig(tokens=75 * 127).n_rows == 75  # without the preset the partial batch stays
    assert IngestConfig(preset="paper", tokens=30 * 127, ablations=("mean",)).n_rows == 30


@pytest.mark.parametrize("kwargs, message", [
    (dict(tokens=59 * 127), "tokens: preset paper needs 2 whole batches of 30 rows for resample ablation "
                            "(--tokens 7620); 7493 tokens make 59 rows"),
    (dict(tokens=10_000, batch_size=8), "batch_size: 8 conflicts with preset paper (batch_size 30)"),
    (dict(tokens=10_000, seq_len=64), "seq_len: 64 conflicts with preset paper (seq_len 128)"),
    (dict(tokens=10_000, preset="papers"), "preset: unknown preset 'papers'; choose from paper"),
])
def test_paper_config_refuses_bad_input(kwargs, message):
    with pytest.raises(ConfigError) as e:
        IngestConfig(**({"preset": "paper"} | kwargs))
    assert str(e.value) == message


# -- rows ------------------------------------------------------------------------------------
def _chunked_tokenize_and_concatenate(texts, tokenizer, max_length):
    """TransformerLens 1.x's tokenize_function on one map batch, written from its description."""
    full = tokenizer.eos_token.join(texts)
    n = (len(full) - 1) // 20 + 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token is not None else tokenizer.eos_token_id
    enc = [tokenizer(full[i * n:(i + 1) * n])["input_ids"] for i in range(20)]
    width = max(map(len, enc))
    tokens = np.array([e + [pad] * (width - len(e)) for e in enc]).flatten()  # padding=True
    tokens = tokens[tokens != pad]
    k = len(tokens) // (max_length - 1)
    body = tokens[:k * (max_length - 1)].reshape(k, max_length - 1)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return np.concatenate([np.full((k, 1), bos), body], axis=1)


def _expected_rows(docs, tokenizer, max_length):
    """The reimplementation mapped as datasets.map(batched=True, num_proc=10) runs it: 10 contiguous shards."""
    import datasets

    ds = datasets.Dataset.from_dict({"text": docs})
    out = []
    for i in range(min(10, len(docs))):
        shard = ds.shard(10, i, contiguous=True)
        for b in range(0, len(shard), 1000):
            out.append(_chunked_tokenize_and_concatenate(shard[b:b + 1000]["text"], tokenizer, max_length))
    return np.concatenate(out)


def _bos_tokenizer():
    """A byte tokenizer like Llama's: its own BOS (id 257) on every call, EOS 256, no pad token."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    base = byte_tokenizer().backend_tokenizer
    base.add_special_tokens(["<s>"])
    base.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 257)])
    return PreTrainedTokenizerFast(tokenizer_object=base, bos_token="<s>", eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "self", "repair", "head", "norm", "\n", "x=1;"]
    docs = [" ".join(rng.choice(words, size=rng.integers(5, 60))) for _ in range(57)]
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path, docs


@pytest.mark.parametrize("make", [byte_tokenizer, _bos_tokenizer], ids=["pad=eos=bos", "own-bos"])
def test_rows_follow_tokenize_and_concatenate(corpus, make):
    path, docs = corpus
    tok = make()
    want = _expected_rows(docs, tok, 16)
    got = tl_rows(str(path), tok, len(want), 16)
    assert np.array_equal(got, want)
    assert not np.any(got[:, 1:] == tok.eos_token_id)  # the quirk: no document separator survives
    with pytest.raises(CorpusError, match=f"makes {len(want)} rows of 16 tokens"):
        tl_rows(str(path), tok, len(want) + 1, 16)
    if tok.bos_token_id != tok.eos_token_id:  # a BOS inside rows: one per tokenised chunk
        assert np.any(got[:, 1:] == tok.bos_token_id)
    # DESIGN.md's default rule keeps the separators.
    default = build_rows(str(path), tok, 60, 16, tok.bos_token_id, tok.eos_token_id)
    assert np.any(default[:, 1:] == tok.eos_token_id)


def test_rows_match_transformer_lens_own(corpus):
    try:
        from transformer_lens.utils import tokenize_and_concatenate
    except ImportError:
        pytest.skip("TransformerLens >= 4 has no transformer_lens.utils and tokenises per document "
                    "(it keeps EOS separators): the authors' chunked version is not installed")
    import inspect

    import datasets

    if "num_chunks" not in inspect.getsource(tokenize_and_concatenate):
        pytest.skip("the installed tokenize_and_concatenate is not the chunked version the authors used")
    path, docs = corpus
    tok = byte_tokenizer()
    ds = tokenize_and_concatenate(datasets.Dataset.from_dict({"text": docs}), tok, max_length=16)
    theirs = np.asarray(ds["tokens"])
    assert np.array_equal(tl_rows(str(path), tok, len(theirs), 16), theirs)


# -- a whole run on a tiny Llama ---------------------------------------------------------------
@pytest.fixture(scope="module")
def paper_store(tmp_path_factory):
    import tiny_models

    folder = tmp_path_factory.mktemp("models") / "tiny-llama-128"
    model = tiny_models.build("llama")
    model.config.max_position_embeddings = SEQ  # rotary: the context is only a config number
    folder.mkdir()
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    store = tmp_path_factory.mktemp("paper-store")
    res = CliRunner().invoke(main, ["ingest", "--model", str(folder), "--store", str(store), "--preset", "paper",
                                    "--tokens", str(61 * 127), "--corpus", "embedded", "--ablations",
                                    "resample,mean", "--neurons-top-k", "5", "--quiet"])
    assert res.exit_code == 0, res.output
    return store, folder, model


def test_paper_run_pairs_batches_and_records_the_preset(paper_store):
    store, folder, _ = paper_store
    st = Store.open(store)
    src = st.sql("SELECT row, source_row FROM resample_sources WHERE sample = 0 ORDER BY row")
    rows, source = src["row"].to_numpy(), src["source_row"].to_numpy()
    assert np.array_equal(rows, np.arange(60))  # 61 rows asked: the partial third batch dropped
    assert np.array_equal(source, (rows + BS) % 60)
    assert not np.any(source // BS == rows // BS)
    manifest = json.loads((store / folder.name / "manifest.json").read_text())
    assert manifest["n_rows"] == 60 and manifest["identity"]["preset"] == "paper"
    assert manifest["preset"]["pairing_rule"] == PAPER_RULE == manifest["resample"]["rule"]
    assert "tokenize_and_concatenate" in manifest["preset"]["rows_rule"]
    assert manifest["preset"]["settings"]["sr_mlps_neurons"] == "penultimate"
    wp = manifest["model"]["weight_processing"]
    assert wp["convention"] == "unfolded" and not (wp["fold_ln"] or wp["center_unembed"])
    # The rows are the tokenize_and_concatenate rows of the embedded corpus.
    from pydoc_data.topics import topics

    from tiny_models import rows_from_store

    want = _expected_rows([topics[k] for k in sorted(topics)], byte_tokenizer(), SEQ)[:60]
    assert np.array_equal(rows_from_store(st, folder.name, 60, SEQ).numpy(), want)


def test_paper_store_cannot_be_extended_without_the_preset(paper_store):
    store, folder, _ = paper_store
    res = CliRunner().invoke(main, ["ingest", "--model", str(folder), "--store", str(store), "--tokens",
                                    str(61 * 127), "--corpus", "embedded", "--batch-size", "30", "--quiet"])
    assert res.exit_code != 0
    assert res.output.strip().splitlines()[-1].startswith(f"Error: {store / folder.name} was ingested with a "
                                                          "different configuration (")


def _recompute(model, rows, patch=None):
    """Plain transformers, the authors' convention: DE = c · W_U[:, y] / s, no final-norm gain, no centring."""
    H, L = model.config.num_attention_heads, model.config.num_hidden_layers
    dh = model.config.hidden_size // H
    kv = model.config.num_key_value_heads
    got = {}
    hooks = [model.model.norm.register_forward_pre_hook(lambda m, a: got.__setitem__("resid", a[0].double()))]
    for layer in range(L):
        attn = model.model.layers[layer].self_attn

        def pre(m, a, layer=layer):
            x = a[0]
            if patch is not None and patch[0] == layer:
                x = x.clone()
                x[..., patch[1] * dh:(patch[1] + 1) * dh] = patch[2]
            got[f"z{layer}"] = x.double()
            return (x,)
        hooks.append(attn.o_proj.register_forward_pre_hook(pre))
        hooks.append(model.model.layers[layer].mlp.register_forward_hook(
            lambda m, a, o, layer=layer: got.__setitem__(f"mlp{layer}", o.double())))
    try:
        with torch.no_grad():
            logits = model(rows).logits.double()
    finally:
        for h in hooks:
            h.remove()
    x = got["resid"]
    s = (x.pow(2).mean(-1) + model.model.norm.variance_epsilon).sqrt()
    y = rows[:, 1:]
    u = model.lm_head.weight.double()[y]  # [batch, pos, d_model]: W_U[:, y], no gain, uncentred
    cut = lambda t: t[:, :-1]  # noqa: E731
    heads = []
    for layer in range(L):
        attn = model.model.layers[layer].self_attn
        W = attn.o_proj.weight.double()  # [d_model, H·dh]
        c = attn.v_proj.bias.double().view(kv, dh)  # a zero input's value: the bias (folded into b_O)
        for h in range(H):
            zh = got[f"z{layer}"][..., h * dh:(h + 1) * dh] - c[h // (H // kv)]
            heads.append((cut(zh @ W[:, h * dh:(h + 1) * dh].T) * u).sum(-1) / cut(s))
    mlps = [(cut(got[f"mlp{layer}"]) * u).sum(-1) / cut(s) for layer in range(L)]
    logit_unit_gain = (cut(x) * u).sum(-1) / cut(s)
    logit_real = logits[:, :-1].gather(-1, y[..., None])[..., 0]
    return torch.stack(heads), torch.stack(mlps), logit_unit_gain, logit_real, got, s


def test_paper_llama_store_matches_the_authors_convention(paper_store):
    store, folder, model = paper_store
    model = model.double().eval()
    st = Store.open(store)
    from tiny_models import rows_from_store

    rows = rows_from_store(st, folder.name, 60, SEQ)
    batch = rows[BS:]  # the second batch: its mean ablation is over its own 30 rows
    heads, mlps, logit, real, got, s = _recompute(model, batch)
    q = lambda sql: st.sql(sql, {"m": folder.name, "t0": BS * (SEQ - 1)})  # noqa: E731
    tok = q("SELECT logit FROM tokens WHERE model = $m AND token_index >= $t0 ORDER BY token_index")
    hd = q("SELECT de FROM head_effects WHERE model = $m AND token_index >= $t0 ORDER BY layer, head, token_index")
    md = q("SELECT de FROM mlp_effects WHERE model = $m AND token_index >= $t0 ORDER BY layer, token_index")
    stored_logit = torch.from_numpy(tok["logit"].to_numpy().copy()).double()
    assert torch.allclose(stored_logit, logit.flatten(), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(stored_logit, real.flatten(), atol=1e-2)  # the real logit has the gain
    assert torch.allclose(torch.from_numpy(hd["de"].to_numpy().copy()).double(), heads.flatten(), atol=1e-4, rtol=1e-4)
    assert torch.allclose(torch.from_numpy(md["de"].to_numpy().copy()).double(), mlps.flatten(), atol=1e-4, rtol=1e-4)
    # Mean ablation of L1H2 over this batch of 30 rows and 128 positions, recomputed with the gain set to 1.
    H, dh = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    z = got["z1"][..., 2 * dh:3 * dh]
    mean_z = z.mean(dim=(0, 1)).expand_as(z)
    norm_w = model.model.norm.weight
    saved = norm_w.detach().clone()
    with torch.no_grad():
        norm_w.fill_(1.0)
    try:
        _, _, _, ablated, _, _ = _recompute(model, batch, patch=(1, 2, mean_z))
    finally:
        with torch.no_grad():
            norm_w.copy_(saved)
    ab = q("SELECT d_logit FROM ablation_effects WHERE model = $m AND ablation = 'mean' AND sample = 0 "
           "AND layer = 1 AND head = 2 AND token_index >= $t0 ORDER BY token_index")
    want = (ablated - logit).flatten()
    assert torch.allclose(torch.from_numpy(ab["d_logit"].to_numpy().copy()).double(), want, atol=1e-4, rtol=1e-4)


# -- CLI -------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, line", [
    (["--preset", "paper", "--batch-size", "8"], "Error: --batch-size 8 contradicts --preset paper (--batch-size 30)"),
    (["--preset", "paper", "--tokens", "100"],
     "Error: tokens: preset paper needs 2 whole batches of 30 rows for resample ablation (--tokens 7620); "
     "100 tokens make 1 rows"),
])
def test_cli_preset_bad_input_is_one_line(tmp_path, args, line):
    res = CliRunner().invoke(main, ["ingest", "--store", str(tmp_path / "s"), *args])
    assert res.exit_code != 0
    assert res.output.strip().splitlines()[-1] == line


def test_cli_unknown_preset(tmp_path):
    res = CliRunner().invoke(main, ["ingest", "--store", str(tmp_path / "s"), "--preset", "papr"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1] == "Error: Invalid value for '--preset': 'papr' is not 'paper'."
