"""Self-tests of the independent recomputation (tests/recompute.py) on every tiny family.

(a) its clean centred logit equals the HF model's own (pre-softcap) logit minus the vocab mean;
(b) patching any head with its own clean z changes nothing;
(c) the DE identity and the sr_ln closed form of DESIGN.md hold for every ablation kind.
"""

import numpy as np
import pytest
import torch

import recompute
import tiny_families

SEQ, ROWS, BATCH = 32, 6, 4  # the last batch is short on purpose (mean ablation per batch)


@pytest.fixture(scope="module")
def rows():
    g = torch.Generator().manual_seed(0)
    r = torch.randint(1, 256, (ROWS, SEQ), generator=g)
    r[:, 0] = tiny_families.BOS
    return r


@pytest.mark.parametrize("family", tiny_families.FAMILIES)
def test_recompute_self_consistent(family, rows):
    model = tiny_families.build(family)
    cl = recompute.clean(model, rows)
    m = cl.extra["model"]
    n = ROWS * (SEQ - 1)
    assert cl.logit.shape == cl.s.shape == (n,) and cl.de_heads.shape == (m.n_layers, m.n_heads, n)

    # (a) our centred logit is HF's own; softcapped families really are softcapped
    np.testing.assert_allclose(cl.logit, cl.hf_logit, atol=1e-5, rtol=0)
    if m.softcap:
        capped = m.softcap * torch.tanh(cl.run.lm / m.softcap)
        torch.testing.assert_close(cl.run.logits, capped, atol=1e-5, rtol=0)
        assert (cl.run.logits - cl.run.lm).abs().max() > 0.1  # active
        assert cl.run.lm.abs().max() < 3 * m.softcap  # not saturated
    else:
        torch.testing.assert_close(cl.run.logits, cl.run.lm * m.logit_scale, atol=1e-5, rtol=1e-5)
    assert np.abs(cl.logit).mean() > 0.3

    # (b) a head patched with its own clean z: nothing moves
    for layer in range(m.n_layers):
        for head in range(m.n_heads):
            ab = recompute.ablate(cl, "clean", layer, head)
            assert np.abs(ab.d_logit).max() < 1e-5, (layer, head)
            assert np.abs(ab.de - cl.de_heads[layer, head]).max() < 1e-5
            assert np.abs(ab.d_de_heads).max() < 1e-5 and np.abs(ab.d_de_mlps).max() < 1e-5

    # (c) identities, with ablations that move the logit visibly
    src = np.roll(np.arange(ROWS), -1)
    moved = []
    for kind in ("resample", "mean", "zero"):
        for layer, head in ((0, 1), (m.n_layers // 2, 2), (m.n_layers - 1, 3)):
            ab = recompute.ablate(cl, kind, layer, head, source_rows=src, batch_size=BATCH)
            e_de, e_ln = recompute.identity_errors(cl, ab, layer, head)
            assert e_de < 1e-4 and e_ln < 1e-4, (kind, layer, head, e_de, e_ln)
            assert np.abs(ab.d_de_bias).max() < 1e-6
            moved.append(np.abs(ab.d_logit).mean())
    assert max(moved) > 0.05, moved


@pytest.mark.parametrize("family", tiny_families.POST_NORM)
def test_post_norm_vo_bias_breaks_the_closed_form_by_exactly_its_own_term(family, rows):
    """With value/output biases in a post-norm block, sr_ln's closed form misses d_de_bias."""
    cl = recompute.clean(tiny_families.build(family, post_norm_vo_bias=True), rows)
    ab = recompute.ablate(cl, "zero", 0, 1)
    e_de, e_ln = recompute.identity_errors(cl, ab, 0, 1)
    _, e_ln_bias = recompute.identity_errors(cl, ab, 0, 1, with_bias=True)
    assert e_de < 1e-4 and e_ln_bias < 1e-4
    assert e_ln > 1e-3 and np.abs(ab.d_de_bias).max() > 1e-3


def test_every_family_builds_fast(rows):
    import time

    for family in tiny_families.FAMILIES:
        t = time.perf_counter()
        model = tiny_families.build(family)
        with torch.no_grad():
            model(rows)
        assert time.perf_counter() - t < 5.0, family  # generous: CI machines are shared


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3"])
def test_sliding_windows_are_live(family, rows):
    """The window (8) is shorter than the rows: widening it changes later positions only."""
    model = tiny_families.build(family)
    types = getattr(model.config, "layer_types", None)
    if family != "mistral":
        assert "sliding_attention" in types and "full_attention" in types
    with torch.no_grad():
        a = model(rows).logits
        model.config.sliding_window = 64
        b = model(rows).logits
    assert (a[:, :tiny_families.WINDOW] - b[:, :tiny_families.WINDOW]).abs().max() < 1e-5
    assert (a - b).abs().max() > 0.1


def test_gptneo_has_local_and_global_layers():
    model = tiny_families.build("gptneo")
    kinds = [block.attn.attention_type for block in model.transformer.h]
    assert "local" in kinds and "global" in kinds and model.config.window_size == tiny_families.WINDOW
