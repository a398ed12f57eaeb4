-- Check: the LayerNorm term equals its closed form
-- Per model and ablation, the largest abs(sr_ln - sr_ln_closed), where sr_ln = sr -
-- sr_heads - sr_mlps and sr_ln_closed = (ln_ratio - 1)(logit_abl - b_U) / ln_ratio
-- (DESIGN.md, tested to 1e-4).
SELECT model,
       ablation,
       count(*) AS n_rows,
       max(abs(sr_ln - sr_ln_closed)) AS max_abs_error
FROM self_repair
GROUP BY model, ablation
ORDER BY model, ablation;
