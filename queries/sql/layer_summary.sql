-- Self-repair per layer
-- Per model and layer, means over each head's top p% tokens of the clean DE, the logit
-- change, self-repair and its LayerNorm part. Printed by ingest after a run.
-- param p: 0.02 — fraction of each model's tokens kept per head
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
SELECT model,
       layer,
       count(DISTINCT head) AS n_heads,
       count(*) AS n_tokens,
       avg(de_clean) AS de,
       avg(d_logit) AS d_logit,
       avg(sr) AS sr,
       avg(sr_ln) AS sr_ln
FROM self_repair_top($p)
WHERE ablation = $ablation AND sample = $sample AND condition = '' AND unit_kind = 'head'
GROUP BY model, layer
ORDER BY model, layer;
