-- Self-repair split into heads, MLPs and LayerNorm
-- Per model and layer, over each head's top p% tokens: mean self-repair and its three
-- parts (sr = sr_heads + sr_mlps + sr_ln), and each as a share of DE, the ratio of means
-- mean(x) / mean(de_clean).
-- param p: 0.02 — fraction of each model's tokens kept per head
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
SELECT model,
       layer,
       count(*) AS n_tokens,
       avg(de_clean) AS de_clean,
       avg(sr) AS sr,
       avg(sr_heads) AS sr_heads,
       avg(sr_mlps) AS sr_mlps,
       avg(sr_ln) AS sr_ln,
       avg(sr) / nullif(avg(de_clean), 0) AS sr_share,
       avg(sr_heads) / nullif(avg(de_clean), 0) AS heads_share,
       avg(sr_mlps) / nullif(avg(de_clean), 0) AS mlps_share,
       avg(sr_ln) / nullif(avg(de_clean), 0) AS ln_share
FROM self_repair_top($p)
WHERE ablation = $ablation AND sample = $sample AND condition = '' AND unit_kind = 'head'
GROUP BY model, layer
ORDER BY model, layer;
