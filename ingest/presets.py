"""Presets: named bundles of settings that reproduce a published setup (`selfrepair ingest --preset paper`).

`paper` is the setup of the authors' code (Rushing & Nanda, ICML 2024; GitHub
starship006/backup_research, `prepare_dataset` and `collect_direct_effect`):

- rows as the TransformerLens `tokenize_and_concatenate` of their time built them
  (`ingest/corpus.py::tl_rows`), 128 tokens each, BOS first;
- whole batches of 30 rows, a partial last batch dropped;
- resample draw 0 takes each row's source from the same row of the next batch, the last
  batch from the first (`ingest/pairing.py::PAPER_RULE`); mean ablation over each batch of 30;
- top 2% of tokens; self-repair of the final MLP's neurons from the penultimate layer's view;
- Llama-family models with their weights unprocessed (TransformerLens `fold_ln=False`,
  `center_writing_weights=False`, `center_unembed=False`), their DE as `collect_direct_effect`
  computed it (`ingest/weights.py::UNFOLDED`); other families as DESIGN.md processes them,
  which is how the authors loaded GPT-2 and Pythia.
"""

from __future__ import annotations

# Settings each preset fixes (IngestConfig fields), recorded in the manifest.
PRESETS: dict[str, dict] = {
    "paper": {
        "seq_len": 128,
        "batch_size": 30,
        "top_p": 0.02,
        "sr_mlps_neurons": "penultimate",
    },
}

# How the preset builds rows and pairs them, recorded in the manifest.
ROWS_RULE = {
    None: "documents tokenised one by one (no special tokens) and joined with EOS; rows of BOS + seq_len-1 tokens; "
          "the last row completed from the next documents",
    "paper": "TransformerLens tokenize_and_concatenate (the chunked version the authors used): per 1000 documents "
             "(within 10 contiguous shards), the texts joined with the EOS string, cut into 20 equal character "
             "chunks, each chunk tokenised with the tokenizer's own special tokens, every pad token (pad = EOS "
             "when the tokenizer has none) deleted, so no document separators remain; seq_len-1 tokens per row "
             "after a BOS, the remainder of each 1000 documents dropped; then whole batches of batch_size rows",
}


def preset_settings(name: str | None) -> dict:
    """The settings a preset fixes ({} for none).

    Raises:
        KeyError: an unknown preset.
    """
    return {} if name is None else dict(PRESETS[name])
