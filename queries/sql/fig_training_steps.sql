-- Self-repair per model, for drawing it against training step
-- Per model, means over every head's top p% tokens (each head's set of the same size) of the
-- clean DE, the logit change, self-repair and its heads/MLPs/LayerNorm parts, in centred
-- logits. The report draws them against training step for the revisions of one model
-- (`selfrepair ingest --revision step1000`: folders NAME@REV).
-- param p: 0.02 — fraction of each model's tokens kept per head
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
SELECT model,
       count(DISTINCT (layer, head)) AS n_heads,
       count(*) AS n_tokens,
       avg(de_clean) AS de_clean,
       avg(d_logit) AS d_logit,
       avg(sr) AS sr,
       avg(sr_heads) AS sr_heads,
       avg(sr_mlps) AS sr_mlps,
       avg(sr_ln) AS sr_ln
FROM self_repair_top($p)
WHERE ablation = $ablation AND sample = $sample AND condition = '' AND unit_kind = 'head'
GROUP BY model
ORDER BY model;
