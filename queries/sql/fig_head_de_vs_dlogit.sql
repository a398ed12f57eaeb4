-- Per-head mean DE against mean logit change, over all tokens
-- Per model and head, over every token (not only the top p%): the mean clean DE of the
-- head and the mean change in the correct token's logit when it is ablated. On the line
-- d_logit = -de_clean the head's whole DE is lost with no self-repair; above it something
-- made up for the loss, below it the logit fell by more than the head's DE (breakage).
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
SELECT model,
       layer,
       head,
       count(*) AS n_tokens,
       avg(de_clean) AS de_clean,
       avg(d_logit) AS d_logit,
       avg(d_de) AS d_de,
       avg(sr) AS sr
FROM self_repair
WHERE ablation = $ablation AND sample = $sample AND condition = '' AND unit_kind = 'head'
GROUP BY model, layer, head
ORDER BY model, layer, head;
