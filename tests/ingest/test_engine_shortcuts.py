"""The fast engine's exact shortcuts, on every tiny family (tests/tiny_families.py: perturbed biases and gains).

A pass has no baseline copy: every change is the copy's value minus the stored clean one, so patching
units with their own clean values must change nothing (float32 and bfloat16). Its first layer does
not recompute attention (its input is clean in every copy: the output is the clean one plus the
heads' change), nor, in a parallel block, the MLP. That the shortcuts give the right numbers under
real ablations is test_families.py's and test_unit_engine.py's business (against plain transformers).
"""

import pytest
import torch

import tiny_families
from selfrepair.ingest import engine as E
from selfrepair.ingest.ablate import FastBatch, unit_kind_problem, unit_patch
from selfrepair.ingest.weights import read_weights
from selfrepair.store.labels import parse_unit

SEQ, BATCH = 12, 2
UNITS = ["L1H0", "L1H1+L2H2", "ATTN1", "MLP1", "BLOCK1", "L2H3", "MLP2"]


def _rows() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(1, 256, (BATCH, SEQ), generator=g)
    rows[:, 0] = tiny_families.BOS
    return rows


def _calls(modules) -> tuple[list, list]:
    """Forward pre-hooks counting calls of `modules`: (handles, counter)."""
    count = []
    return [m.register_forward_pre_hook(lambda *a: count.append(1)) for m in modules], count


@pytest.mark.parametrize("family", tiny_families.FAMILIES)
def test_clean_patches_change_nothing_and_the_first_layer_skips_attention(family):
    w = read_weights(tiny_families.build(family), SEQ)
    rows = _rows()
    units = [u for u in (parse_unit(x, w.n_layers, w.n_heads) for x in UNITS)
             if not unit_kind_problem(w.family.name, u.kind)]
    u = w.target_columns(rows.roll(-1, dims=1))
    for dtype in (None, torch.bfloat16):
        ctx = FastBatch(w, rows, dtype)
        de_h, de_m = ctx.component_des(u)
        for layer in sorted({x.layer for x in units}):
            mine = [x for x in units if x.layer == layer]
            # Resampling a batch from itself: every replacement is the component's own clean value.
            patches = [unit_patch(ctx, ctx, "resample", x, w.n_heads) for x in mine]
            # What runs inside the module (its projections), not the module's own (replaced) forward.
            inside = lambda m: [x for x in m.modules() if x is not m]  # noqa: E731
            inner = inside(E.attn_module(w, layer)) + (inside(w.mlp_out[layer]) if w.parallel else [])
            handles, count = _calls(inner)
            try:
                r = ctx.patch(layer, patches, None, u)
            finally:
                for h in handles:
                    h.remove()
            assert not count, f"{family}: layer {layer}'s attention (or parallel MLP) ran in its own pass"
            tag = (family, dtype, layer)
            assert (r.logit - ctx.clean_logit(u)).abs().max() < 1e-5, tag
            assert (r.scale / ctx.scale() - 1).abs().max() < 1e-6, tag
            assert r.d_de_heads.abs().max() < 1e-5 and r.d_de_mlps.abs().max() < 1e-5, tag
            for j, x in enumerate(mine):
                want = sum(de_h[:, :, l, h] for l, h in x.heads(w.n_heads)) + sum(de_m[:, :, l] for l in x.mlps())
                assert (r.de[j] - want).abs().max() < 1e-5, (*tag, x.label)
            if w.down_final is not None:
                assert (r.post_final - ctx.post_final()).abs().max() < 1e-5 * (1 + ctx.post_final().abs().max()), tag
