"""Independent cross-check: stored values equal a plain `run_with_hooks` recomputation.

Nothing here uses selfrepair's engines: the bridge runs the model, a hook swaps one
head's `hook_z`, and the logit, the ablated head's DE, the ΔDE of every other head
(from `hook_z` differences and W_O) and of every MLP (from `hook_mlp_out` differences),
and the ablated final-norm scale are read off the full hooked run.
"""

import numpy as np
import pytest
import torch

from selfrepair import Store
from selfrepair.ingest.models import load_model
from tiny_models import rows_from_store

CASES = [("gpt2", 0, 1), ("gpt2", 1, 3), ("neox", 0, 2), ("llama", 0, 0), ("llama", 1, 2)]


_rows = rows_from_store


@pytest.mark.parametrize("family,layer,head", CASES)
@pytest.mark.parametrize("kind", ["resample", "mean", "zero"])
def test_stored_values_equal_hooked_recompute(tiny_store, tiny_model_dirs, family, layer, head, kind):
    store = Store.open(tiny_store)
    model_name = f"tiny-{family}"
    manifest = store.manifest(model_name)
    seq_len, n_rows, batch = manifest.seq_len, manifest.n_rows, manifest.config.batch_size
    rows = _rows(store, model_name, n_rows, seq_len)
    bridge = load_model(str(tiny_model_dirs[family])).bridge
    n_layers = bridge.cfg.n_layers
    z_names = [f"blocks.{L}.attn.hook_z" for L in range(n_layers)]
    mlp_names = [f"blocks.{L}.hook_mlp_out" for L in range(n_layers)]
    read = set(z_names + mlp_names + ["ln_final.hook_scale"])
    hook_name = z_names[layer]
    with torch.no_grad():
        _, clean = bridge.run_with_cache(rows, names_filter=lambda n: n in read)
    z_clean = clean[hook_name]  # [row, pos, head, d_head]
    if kind == "resample":
        src = store.sql("SELECT source_row FROM resample_sources WHERE model = $m AND sample = 0 ORDER BY row",
                        {"m": model_name})["source_row"].to_numpy()
        z_new = z_clean[torch.from_numpy(src.astype(np.int64)), :, head]
    elif kind == "mean":
        z_new = torch.cat([z_clean[r:r + batch, :, head].mean((0, 1), keepdim=True).expand(
            min(batch, n_rows - r), seq_len, -1) for r in range(0, n_rows, batch)])
    else:
        z_new = torch.zeros_like(z_clean[:, :, head])

    def patch(z, hook):
        z = z.clone()
        z[:, :, head] = z_new
        return z

    ablated = {}

    def keep(x, hook):
        ablated[hook.name] = x.detach().clone()
        return x

    # The patch runs before `keep` on the ablated layer, so `ablated` holds what flowed on.
    with torch.no_grad():
        logits = bridge.run_with_hooks(rows, fwd_hooks=[(hook_name, patch)] + [(n, keep) for n in sorted(read)])
    y = rows[:, 1:]
    logit_abl = logits[:, :-1].gather(-1, y[..., None])[..., 0].reshape(-1).numpy()
    u = bridge.W_U.detach()[:, y]  # [d_model, row, pos]
    W_O = bridge.W_O.detach()  # [layer, head_index, d_head, d_model]
    s = clean["ln_final.hook_scale"][:, :-1, 0]  # every DE uses the clean scale
    de_abl = (torch.einsum("rpd,dm,mrp->rp", z_new[:, :-1], W_O[layer, head], u) / s).reshape(-1).numpy()
    # ΔDE of every other head: (z_abl - z_clean) @ W_O through the correct token's column.
    d_de_heads = torch.zeros_like(s)
    for L, name in enumerate(z_names):
        dz = (ablated[name] - clean[name])[:, :-1]  # [row, pos, head_index, d_head]
        if L == layer:
            dz[:, :, head] = 0  # the ablated head itself is `de`, not repair
        d_de_heads += torch.einsum("rphd,hdm,mrp->rp", dz, W_O[L], u) / s
    d_de_mlps = sum(torch.einsum("rpm,mrp->rp", (ablated[n] - clean[n])[:, :-1], u) / s for n in mlp_names)
    scale_abl = ablated["ln_final.hook_scale"][:, :-1, 0]

    got = store.sql(
        "SELECT t.logit + a.d_logit AS logit_abl, a.de, a.d_de_heads, a.d_de_mlps, a.ln_scale "
        "FROM ablation_effects a JOIN tokens t USING (model, token_index) "
        "WHERE a.model = $m AND ablation = $k AND sample = 0 AND layer = $l AND head = $h ORDER BY token_index",
        {"m": model_name, "k": kind, "l": layer, "h": head},
    )
    assert got.height == n_rows * (seq_len - 1)
    want = {"logit_abl": logit_abl, "de": de_abl, "d_de_heads": d_de_heads.reshape(-1).numpy(),
            "d_de_mlps": d_de_mlps.reshape(-1).numpy(), "ln_scale": scale_abl.reshape(-1).numpy()}
    for col, value in want.items():
        np.testing.assert_allclose(got[col].to_numpy(), value, atol=1e-4, rtol=0, err_msg=col)
    assert np.abs(got["de"].to_numpy()).max() > 0 or kind == "zero"
    # The later layers really respond, so the ΔDE checks compare non-trivial numbers.
    if layer < n_layers - 1:
        assert np.abs(want["d_de_mlps"]).max() > 1e-2
