-- Share of each head's self-repair from the MLPs (authors' statistic)
-- For every head of one layer (layer -1: the penultimate layer, n_layers - 2), over its top p%
-- tokens by clean DE on which sr > 0: the mean of clip(max(sr_mlps, 0) / sr, 0, 1) per token,
-- with sr_mlps = d_de_mlps summed over every MLP layer, as Rushing & Nanda's code did. The
-- ratio of means over the final MLP alone is the query `fig_final_mlp_share`.
-- param layer: -1 — layer of the ablated heads, -1 for the penultimate layer
-- param p: 0.02 — fraction of each model's tokens kept per head
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
SELECT s.model,
       s.layer,
       s.head,
       count(*) AS n_tokens,
       avg(s.sr) AS sr,
       avg(s.sr_mlps) AS sr_mlps,
       avg(least(greatest(greatest(s.sr_mlps, 0) / s.sr, 0), 1)) AS mlps_share
FROM self_repair_top($p) s
JOIN models m USING (model)
WHERE s.ablation = $ablation AND s.sample = $sample AND s.sr > 0 AND s.condition = '' AND s.unit_kind = 'head'
  AND s.layer = CASE WHEN $layer < 0 THEN m.n_layers - 2 ELSE $layer END
GROUP BY s.model, s.layer, s.head
ORDER BY s.model, s.layer, s.head;
