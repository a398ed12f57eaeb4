-- Spread of each head's self-repair across resample draws
-- Per model, head and resample draw: the mean self-repair and clean DE over the head's
-- top p% tokens under resample ablation, one row per draw.
-- param p: 0.02 — fraction of each model's tokens kept per head
SELECT model,
       layer,
       head,
       sample,
       count(*) AS n_tokens,
       avg(de_clean) AS de_clean,
       avg(sr) AS sr
FROM self_repair_top($p)
WHERE ablation = 'resample' AND condition = '' AND unit_kind = 'head'
GROUP BY model, layer, head, sample
ORDER BY model, layer, head, sample;
