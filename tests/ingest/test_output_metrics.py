"""Output metrics (DESIGN.md, "Beyond single heads"): the chunked computation against full-vocabulary
softmaxes of the model's own forward (tests/recompute.py, no selfrepair code), `--output-metrics none`,
and the bad inputs.

The stored metrics of every family, through SQL, are checked in test_families.py (each family's own
ingest) and test_crosscheck.py's store; the Ray executor's in test_ray.py (tables equal to in-process).
"""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import recompute
import tiny_families
from selfrepair import Store
from selfrepair.cli import main
from selfrepair.errors import QueryError
from selfrepair.store.schema import METRIC_COLUMNS, TABLES, without_metrics
from selfrepair.store.verify import verify
from tiny_models import SMALL_STORE

SEQ, ROWS = 24, 3
METRICS = ("d_loss", "kl", "d_entropy")


@pytest.fixture(scope="module")
def rows():
    g = torch.Generator().manual_seed(1)
    r = torch.randint(1, 256, (ROWS, SEQ), generator=g)
    r[:, 0] = tiny_families.BOS
    return r


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "cohere"])  # plain; final softcap; logit scale
def test_chunked_metrics_equal_full_softmaxes_at_any_chunk_size(family, rows):
    """The engine's metrics at vocabulary chunks of 16, 100 and all 257 equal float64 softmaxes of the
    model's own logits (softcap and logit scale included), for a zero and a mean ablation."""
    from selfrepair.ingest.ablate import FastBatch, replacement
    from selfrepair.ingest.weights import read_weights

    model = tiny_families.build(family)
    cl = recompute.clean(model, rows, family)
    w = read_weights(model, SEQ)
    layer, head = 0, 1
    for kind in ("zero", "mean"):
        ab = recompute.ablate(cl, kind, layer, head, batch_size=ROWS)
        got = {}
        for chunk in (16, 100, 257):
            fast = FastBatch(w, rows, metrics=True, vocab_chunk=chunk)
            z = replacement(kind, fast.clean_z(layer), None)[:, :, [head]].permute(2, 0, 1, 3)
            r = fast.patch(layer, [head], z, w.target_columns(rows.roll(-1, dims=1)))
            got[chunk] = {m: getattr(r, m)[0, :, :-1].reshape(-1).double().numpy() for m in (*METRICS, "top1_changed")}
            for m in METRICS:
                np.testing.assert_allclose(got[chunk][m], ab.metrics[m], rtol=0, atol=2e-5, err_msg=f"{kind} {m} {chunk}")
            flips = got[chunk]["top1_changed"] != ab.metrics["top1_changed"]
            assert not (flips & ~ab.metrics["near_tie"]).any()
        for m in METRICS:  # the chunking changes only the order of float32 sums (entropies of ~5.5 nats)
            np.testing.assert_allclose(got[16][m], got[257][m], rtol=0, atol=4e-6)
        assert np.abs(ab.metrics["kl"]).max() > 1e-3  # the ablation moves the distribution: not vacuous
        assert (ab.metrics["kl"] >= 0).all()
        baseline = fast.output()
        np.testing.assert_allclose(baseline.loss[:, :-1].reshape(-1).double().numpy(), cl.extra["output"]["loss"],
                                   rtol=0, atol=2e-5)
        np.testing.assert_allclose(baseline.entropy[:, :-1].reshape(-1).double().numpy(),
                                   cl.extra["output"]["entropy"], rtol=0, atol=2e-5)


def test_an_identity_patch_changes_no_metric(rows):
    """A head patched with its own clean z: every metric exactly 0, no top-1 flips."""
    from selfrepair.ingest.ablate import FastBatch
    from selfrepair.ingest.weights import read_weights

    model = tiny_families.build("llama")
    w = read_weights(model, SEQ)
    fast = FastBatch(w, rows, metrics=True, vocab_chunk=64)
    z = fast.clean_z(1)[:, :, [2]].permute(2, 0, 1, 3)
    r = fast.patch(1, [2], z, w.target_columns(rows.roll(-1, dims=1)))
    for m in METRICS:
        assert getattr(r, m).abs().max() < 1e-6, m
    assert not r.top1_changed.any()


class _Identity:
    """A final norm that passes the residual through: integer residuals and unembeddings then give exact logits."""

    @staticmethod
    def apply(x):
        return x.float()


def _synthetic_head(softcap=None, bias=False, chunk=96, vocab=1000, d=8, seed=0):
    """An output head with small-integer weights and many duplicated rows (exact ties between logits)."""
    from selfrepair.ingest.output_metrics import OutputHead

    g = torch.Generator().manual_seed(seed)
    distinct = torch.randint(-3, 4, (vocab // 4, d), generator=g).float()
    W = distinct[torch.randint(0, vocab // 4, (vocab,), generator=g)]  # each row ~4 times over
    b = torch.randint(-2, 3, (vocab,), generator=g).float() if bias else torch.zeros(vocab)
    return OutputHead(_Identity(), W, b, softcap=softcap, chunk=chunk)


def _reference_metrics(head, resid, abl, y):
    """The metrics from whole float64 logits, computed here without selfrepair code."""
    def logits(r):
        x = r.double() @ head.W.double().T + head.b.double()
        return x if head.softcap is None else head.softcap * torch.tanh(x / head.softcap)

    lp, lq = torch.log_softmax(logits(resid), -1), torch.log_softmax(logits(abl), -1)
    nll = lambda l: -l.gather(-1, y.expand(l.shape[:-1])[..., None])[..., 0]  # noqa: E731
    return {"d_loss": nll(lq) - nll(lp), "kl": (lp.exp() * (lp - lq)).sum(-1),
            "d_entropy": -(lq.exp() * lq).sum(-1) + (lp.exp() * lp).sum(-1),
            "top1_changed": logits(abl).argmax(-1) != logits(resid).argmax(-1)}


@pytest.mark.parametrize("softcap,bias", [(None, False), (None, True), (30.0, True)])
def test_chunked_metrics_of_exact_logits_with_ties(softcap, bias):
    """Logits with exact ties (duplicated unembedding rows, integer inputs) across and within chunks, a
    last chunk shorter than the others: every metric equals the float64 full-vocabulary one, and
    top1_changed is exactly `argmax p' != argmax p` with ties going to the lower index."""
    from selfrepair.ingest.output_metrics import Baseline

    head = _synthetic_head(softcap, bias)
    g = torch.Generator().manual_seed(1)
    resid = torch.randint(-2, 3, (3, 7, 8), generator=g).float()
    abl = resid + torch.randint(-1, 2, (6, 3, 7, 8), generator=g).float() * (torch.rand(6, 1, 1, 1, generator=g) < .8)
    y = torch.randint(0, head.d_vocab, (3, 7), generator=g)
    got = Baseline.of(head, resid, y).ablated(abl)
    want = _reference_metrics(head, resid, abl, y)
    for m in METRICS:
        np.testing.assert_allclose(got[m].double().numpy(), want[m].numpy(), rtol=0, atol=1e-5, err_msg=m)
    assert torch.equal(got["top1_changed"], want["top1_changed"])
    assert want["top1_changed"].any() and not want["top1_changed"].all()  # not vacuous
    ties = (lambda x: (x == x.amax(-1, keepdim=True)).sum(-1) > 1)(resid.double() @ head.W.double().T + head.b.double())
    assert ties.any()  # the baseline's top-1 is tied somewhere


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_a_copys_metrics_do_not_depend_on_the_other_copies_of_its_pass(softcap):
    """Each copy's numbers, bit for bit, whether it runs alone, first, last or among others, on one
    thread or two (a store extended unit by unit equals one run)."""
    from selfrepair.ingest.output_metrics import Baseline

    head = _synthetic_head(softcap, bias=True, chunk=100, vocab=1003, d=24)
    g = torch.Generator().manual_seed(2)
    resid = torch.randn(2, 9, 24, generator=g)
    abl = resid + 0.5 * torch.randn(7, 2, 9, 24, generator=g)
    base = Baseline.of(head, resid, torch.randint(0, head.d_vocab, (2, 9), generator=g))
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            everyone = base.ablated(abl)
            for picks in ([3], [6, 0], [2, 5, 1, 4]):
                some = base.ablated(abl[picks])
                for m, v in some.items():
                    assert torch.equal(v, everyone[m][picks]), (n, picks, m)
    finally:
        torch.set_num_threads(threads)


# -- --output-metrics none, through the store ----------------------------------------------------
@pytest.fixture(scope="module")
def stores(tiny_stores, tmp_path_factory):
    """SMALL_STORE of tiny GPT-2 with the metrics (the session's) and without them (`--output-metrics none`)."""
    base = tmp_path_factory.mktemp("metrics")
    return (tiny_stores.copy("gpt2", base / "all", **SMALL_STORE),
            tiny_stores.copy("gpt2", base / "none", **SMALL_STORE, output_metrics="none"))


def test_output_metrics_none_leaves_the_columns_out_and_nothing_else(stores):
    import pyarrow.parquet as pq

    with_, without = (Store.open(s) for s in stores)
    for table, cols in METRIC_COLUMNS.items():
        keep = ", ".join(without_metrics(table))
        order = ", ".join(TABLES[table].key)
        q = f"SELECT {keep} FROM {table} ORDER BY {order}"
        assert without.sql(q).equals(with_.sql(q)), table  # every other column identical
        n = without.sql(f"SELECT count(*) AS n, {', '.join(f'count({c}) AS {c}' for c in cols)} FROM {table}")
        assert all(n[c][0] == 0 for c in cols), table  # read as NULL
        if table != "condition_tokens":
            assert with_.sql(f"SELECT count(*) AS n FROM {table}")["n"][0] > 0
            assert with_.sql(f"SELECT count({cols[0]}) AS n FROM {table}")["n"][0] == n["n"][0]  # all there
    folder = stores[1] / "tiny-gpt2"
    files = list((folder / "tables" / "ablation_effects").glob("*.parquet"))
    assert files and all(set(METRIC_COLUMNS["ablation_effects"]).isdisjoint(pq.read_schema(f).names) for f in files)
    assert verify(stores[1]).ok
    with pytest.raises(QueryError, match="was ingested without \\(--output-metrics none"):
        without.query("units_by_metric", ablation="zero")
    got = with_.query("units_by_metric", ablation="zero", metric="d_loss")
    assert got.height == 4 and got["d_loss"].null_count() == 0


def test_the_plan_states_the_metrics_cost(tiny_model_dirs, tmp_path):
    args = ["ingest", "--model", str(tiny_model_dirs["gpt2"]), "--store", str(tmp_path), "--tokens", "62",
            "--seq-len", "32", "--batch-size", "2", "--corpus", "embedded", "--dry-run"]
    out = CliRunner().invoke(main, args).output
    line = next(l for l in out.splitlines() if "output metrics" in l).strip()
    # 2 · d_model 32 · d_vocab 257; heads of a layer share a pass: 4 copies + 1 baseline per 4 units.
    assert line.startswith("output metrics all (d_loss, kl, d_entropy, top1_changed): the full unembedding, "
                           "2·d_model·d_vocab = 16.4 kFLOP per token per copy"), line
    from selfrepair.store.flops import Arch, head_ablation_flops, output_metric_flops

    a = Arch(2, 4, 4, 8, 32, 128, False, False)
    share = output_metric_flops(32, 257, 4) * 8 / sum(4 * head_ablation_flops(a, l, 32) for l in range(2))
    assert f"+{share:.0%} of the sweep's FLOPs" in line
    out = CliRunner().invoke(main, args + ["--output-metrics", "none"]).output
    assert "output metrics none: no d_loss, kl, d_entropy or top1_changed" in out


# -- bad input: one line, before the model loads --------------------------------------------------
@pytest.mark.parametrize("value,line", [
    ("loss", "Error: Invalid value for '--output-metrics': unknown output metric 'loss'; choose all, none, or "
             "d_loss, kl, d_entropy, top1_changed"),
    ("kl,d_loss", "Error: Invalid value for '--output-metrics': the output metrics share one pass over the "
                  "vocabulary and are stored together; name all four (missing d_entropy, top1_changed), all or none"),
])
def test_a_bad_metric_name_gets_one_line(tiny_model_dirs, tmp_path, value, line):
    res = CliRunner().invoke(main, ["ingest", "--model", str(tiny_model_dirs["gpt2"]), "--store", str(tmp_path),
                                    "--output-metrics", value])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert [l for l in res.output.splitlines() if l.startswith("Error")] == [line]
    assert not any(tmp_path.iterdir())


def test_a_model_whose_logits_the_metrics_cannot_read_is_refused_before_it_loads(tmp_path, monkeypatch):
    from transformers import GraniteConfig

    from selfrepair.ingest import models

    def no_load(*a, **k):
        raise AssertionError("the model loaded before the output metrics were checked")

    monkeypatch.setattr(models, "load_model", no_load)
    cfg = GraniteConfig(vocab_size=257, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, logits_scaling=8.0)
    cfg.architectures = ["GraniteForCausalLM"]
    cfg.save_pretrained(tmp_path / "granite")
    res = CliRunner().invoke(main, ["ingest", "--model", str(tmp_path / "granite"), "--store", str(tmp_path / "s")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    errors = [l for l in res.output.splitlines() if l.startswith("Error")]
    assert errors == ["Error: output metrics (d_loss, kl, d_entropy, top1_changed) need the model's true output "
                      "distribution, but GraniteForCausalLM divides its logits by a scale (logits_scaling=8.0), "
                      "which selfrepair's unembedding does not model; use --output-metrics none"]
    assert not (tmp_path / "s").exists()


def test_the_plan_counts_a_softcapped_models_baseline_per_pass(tmp_path):
    """With a final softcap each pass recomputes the baseline's logits (store/flops.py): the plan, read from the
    config before any load, states a larger share than for the same model without the softcap."""
    import json
    import re

    import tiny_families

    def share(folder):
        out = CliRunner().invoke(main, ["ingest", "--model", str(folder), "--store", str(tmp_path / "s"), "--tokens",
                                        "62", "--seq-len", "32", "--corpus", "embedded", "--dry-run"]).output
        line = next(l for l in out.splitlines() if "output metrics all" in l)
        return int(re.search(r"\+(\d+)% of the sweep's FLOPs", line).group(1))

    capped = tiny_families.save("gemma2", tmp_path / "capped")
    plain = tiny_families.save("gemma2", tmp_path / "plain")
    cfg = json.loads((plain / "config.json").read_text())
    assert cfg["final_logit_softcapping"]
    cfg["final_logit_softcapping"] = None  # absent, Gemma2Config would default it to 30
    (plain / "config.json").write_text(json.dumps(cfg))
    assert share(capped) > share(plain) > 0
