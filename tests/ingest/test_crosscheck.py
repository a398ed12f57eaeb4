"""Independent cross-check: stored values equal a plain `run_with_hooks` recomputation.

Nothing here uses selfrepair's engines: the bridge runs the model, a hook swaps one
head's `hook_z`, and the logit and DE are read off the full output.
"""

import numpy as np
import pytest
import torch

from selfrepair import Store
from selfrepair.ingest.models import load_model

CASES = [("gpt2", 0, 1), ("gpt2", 1, 3), ("neox", 0, 2), ("llama", 0, 0), ("llama", 1, 2)]


def _rows(store, model, n_rows, seq_len):
    toks = store.sql(
        "SELECT row, pos, token_id, next_token_id FROM tokens WHERE model = $m ORDER BY row, pos", {"m": model}
    )
    ids = toks["token_id"].to_numpy().reshape(n_rows, seq_len - 1)
    last = toks["next_token_id"].to_numpy().reshape(n_rows, seq_len - 1)[:, -1:]
    return torch.from_numpy(np.concatenate([ids, last], 1).astype(np.int64))


@pytest.mark.parametrize("family,layer,head", CASES)
@pytest.mark.parametrize("kind", ["resample", "mean", "zero"])
def test_stored_values_equal_hooked_recompute(tiny_store, tiny_model_dirs, family, layer, head, kind):
    store = Store.open(tiny_store)
    model_name = f"tiny-{family}"
    manifest = store.manifest(model_name)
    seq_len, n_rows, batch = manifest["seq_len"], manifest["n_rows"], manifest["config"]["batch_size"]
    rows = _rows(store, model_name, n_rows, seq_len)
    bridge = load_model(str(tiny_model_dirs[family])).bridge
    hook_name = f"blocks.{layer}.attn.hook_z"
    with torch.no_grad():
        _, clean = bridge.run_with_cache(rows, names_filter=lambda n: n in (hook_name, "ln_final.hook_scale"))
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

    with torch.no_grad():
        logits = bridge.run_with_hooks(rows, fwd_hooks=[(hook_name, patch)])
    y = rows[:, 1:]
    logit_abl = logits[:, :-1].gather(-1, y[..., None])[..., 0].reshape(-1).numpy()
    u = bridge.W_U.detach()[:, y]  # [d_model, row, pos]
    s = clean["ln_final.hook_scale"][:, :-1, 0]
    de_abl = (torch.einsum("rpd,dm,mrp->rp", z_new[:, :-1], bridge.W_O.detach()[layer, head], u) / s).reshape(-1).numpy()

    got = store.sql(
        "SELECT t.logit + a.d_logit AS logit_abl, a.de FROM ablation_effects a JOIN tokens t USING (model, token_index) "
        "WHERE a.model = $m AND ablation = $k AND sample = 0 AND layer = $l AND head = $h ORDER BY token_index",
        {"m": model_name, "k": kind, "l": layer, "h": head},
    )
    np.testing.assert_allclose(got["logit_abl"].to_numpy(), logit_abl, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["de"].to_numpy(), de_abl, atol=1e-4, rtol=0)
    assert np.abs(logit_abl - got["logit_abl"].to_numpy()).max() < 1e-4
    assert np.abs(got["de"].to_numpy()).max() > 0 or kind == "zero"
