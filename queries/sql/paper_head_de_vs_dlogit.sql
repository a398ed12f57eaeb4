-- Per-head DE against logit change, all tokens (authors' statistic)
-- Per head, Rushing & Nanda's averaging: over the tokens with |clean DE| > 0, the mean of each
-- batch of batch_size rows, then the mean over batches, of the clean DE and of the logit change.
-- The query `fig_head_de_vs_dlogit` takes plain means over every token.
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
SELECT model, layer, head, n_batches, n_tokens, de_clean, d_logit
FROM paper_head_means($ablation, $sample)
ORDER BY model, layer, head;
