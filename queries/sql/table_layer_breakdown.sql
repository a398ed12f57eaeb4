-- Self-repair breakdown per layer (paper table)
-- Per model and layer, means over each head's top p% tokens, in centred logits rounded to
-- 4 decimals: clean DE, ablated DE, logit change, self-repair and its heads/MLPs/LayerNorm
-- parts; LN share = 100 * mean(sr_ln) / mean(DE), a ratio of means, in percent.
-- param p: 0.02 — fraction of each model's tokens kept per head
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
SELECT model AS "Model",
       layer AS "Layer",
       count(*) AS "Tokens",
       round(avg(de_clean), 4) AS "DE",
       round(avg(de_ablated), 4) AS "Ablated DE",
       round(avg(d_logit), 4) AS "Logit change",
       round(avg(sr), 4) AS "Self-repair",
       round(avg(sr_heads), 4) AS "Heads",
       round(avg(sr_mlps), 4) AS "MLPs",
       round(avg(sr_ln), 4) AS "LayerNorm",
       round(100 * avg(sr_ln) / nullif(avg(de_clean), 0), 1) AS "LN share (%)"
FROM self_repair_top($p)
WHERE ablation = $ablation AND sample = $sample AND condition = '' AND unit_kind = 'head'
GROUP BY model, layer
ORDER BY model, layer;
