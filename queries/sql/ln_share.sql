-- LayerNorm share of the direct effect, per head and per layer
-- Over each head's top p% tokens: ln_share = mean(sr_ln) / mean(de_clean) (ratio of
-- means), and the paper's per-token clipped share avg(clip(sr_ln / de_clean, 0, 1)) as
-- ln_share_clipped. Rows with head NULL are the per-layer totals.
-- param p: 0.02 — fraction of each model's tokens kept per head
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
SELECT model,
       layer,
       head,
       count(*) AS n_tokens,
       avg(de_clean) AS de_clean,
       avg(sr_ln) AS sr_ln,
       avg(sr_ln) / nullif(avg(de_clean), 0) AS ln_share,
       avg(least(greatest(sr_ln / nullif(de_clean, 0), 0), 1)) AS ln_share_clipped
FROM self_repair_top($p)
WHERE ablation = $ablation AND sample = $sample AND condition = '' AND unit_kind = 'head'
GROUP BY GROUPING SETS ((model, layer, head), (model, layer))
ORDER BY model, layer, head NULLS LAST;
