-- Per-head mean logit change against mean loss change and KL, over all tokens
-- Per model and head ablated alone, over every stored token: the mean change in the correct
-- token's logit (d_logit), in its loss (d_loss) and the mean KL(clean ‖ ablated) of the whole
-- output distribution, with the fraction of tokens whose top-1 prediction flips. A head far
-- from the trend of the others moves the distribution more (or less) than its logit change says.
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
-- needs: output_metrics
SELECT model,
       layer,
       head,
       count(*) AS n_tokens,
       avg(d_logit) AS d_logit,
       avg(d_loss) AS d_loss,
       avg(kl) AS kl,
       avg(d_entropy) AS d_entropy,
       avg(top1_changed::DOUBLE) AS top1_changed
FROM self_repair
WHERE ablation = $ablation AND sample = $sample AND condition = '' AND unit_kind = 'head'
GROUP BY model, layer, head
ORDER BY model, layer, head;
