-- Self-repair of each head over all tokens
-- Per head, means over every token (not only the top p%) of the clean and ablated DE,
-- the logit change, self-repair and its heads/MLPs/LayerNorm split, and the ln_ratio;
-- the all-token counterpart of head_top_self_repair (the paper's all_tokens rows).
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
SELECT model,
       layer,
       head,
       count(*) AS n_tokens,
       avg(de_clean) AS de_clean,
       avg(de_ablated) AS de_ablated,
       avg(d_logit) AS d_logit,
       avg(sr) AS sr,
       avg(sr_heads) AS sr_heads,
       avg(sr_mlps) AS sr_mlps,
       avg(sr_ln) AS sr_ln,
       avg(ln_ratio) AS ln_ratio
FROM self_repair
WHERE ablation = $ablation AND sample = $sample AND condition = '' AND unit_kind = 'head'
GROUP BY model, layer, head
ORDER BY model, layer, head;
