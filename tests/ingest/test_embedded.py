"""The embedded SmolLM2-135M is a real model: its loss on the embedded corpus is far below chance."""

import math

from selfrepair import Store
from selfrepair.ingest.config import IngestConfig
from selfrepair.ingest.runner import Ingest


def test_embedded_model_predicts_real_text(tmp_path):
    Ingest(IngestConfig(store=tmp_path, tokens=254, seq_len=128, batch_size=2, heads="L29H0",
                        quiet=True, activations=False, neurons_top_k=0)).run()
    store = Store.open(tmp_path)
    manifest = store.manifest("smollm2-135m")
    assert manifest["model"]["n_layers"] == 30 and manifest["model"]["n_heads"] == 9
    assert manifest["model"]["norm"] == "RMS"
    loss = store.sql("SELECT avg(loss) AS l FROM tokens")["l"][0]
    uniform = math.log(manifest["model"]["d_vocab"])  # 10.8 nats for 49152 tokens
    assert loss < 0.5 * uniform, loss
    assert store.query("check_de_identity")["max_abs_error"][0] < 1e-3
