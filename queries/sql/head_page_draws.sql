-- One head's self-repair in each resample draw
-- Per model and resample draw, means over the top p% tokens of the ablated head (layer,
-- head) of the logit change, self-repair and its heads/MLPs/LayerNorm split: how much the
-- page's numbers move with the resample source rows.
-- param layer — layer of the ablated head (or head=L26H6 for both)
-- param head — head index
-- param p: 0.02 — fraction of each model's tokens kept per head
SELECT model,
       sample,
       count(*) AS n_tokens,
       avg(d_logit) AS d_logit,
       avg(sr) AS sr,
       avg(sr_heads) AS sr_heads,
       avg(sr_mlps) AS sr_mlps,
       avg(sr_ln) AS sr_ln
FROM self_repair_top($p)
WHERE layer = $layer AND head = $head AND ablation = 'resample'
GROUP BY model, sample
ORDER BY model, sample;
