-- Per-layer DE, ablated DE and the three parts of self-repair
-- Per model and layer, means over each head's top p% tokens of the clean DE, the ablated
-- head's DE (clean scale), the logit change, self-repair and its heads/MLPs/LayerNorm
-- parts (sr = sr_heads + sr_mlps + sr_ln), in centred logits.
-- param p: 0.02 — fraction of each model's tokens kept per head
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
SELECT model,
       layer,
       count(*) AS n_tokens,
       avg(de_clean) AS de_clean,
       avg(de_ablated) AS de_ablated,
       avg(d_logit) AS d_logit,
       avg(sr) AS sr,
       avg(sr_heads) AS sr_heads,
       avg(sr_mlps) AS sr_mlps,
       avg(sr_ln) AS sr_ln
FROM self_repair_top($p)
WHERE ablation = $ablation AND sample = $sample AND condition = '' AND unit_kind = 'head'
GROUP BY model, layer
ORDER BY model, layer;
