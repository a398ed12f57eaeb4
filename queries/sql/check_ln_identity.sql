-- Check: the LayerNorm term equals its closed form
-- Per model and ablation, the largest abs(sr_ln - sr_ln_closed), where sr_ln = sr -
-- sr_heads - sr_mlps and sr_ln_closed = (ln_ratio - 1)(logit_abl - b_U) / ln_ratio
-- (DESIGN.md, tested to 1e-4), over every ablated unit's rows: heads, groups, ATTN, MLP and
-- BLOCK units, and conditioned rows against their condition's run (self_repair's baseline).
-- n_unit_rows and n_conditioned_rows count the rows that are not one head, and the rows
-- ablated under a condition.
SELECT model,
       ablation,
       count(*) AS n_rows,
       max(abs(sr_ln - sr_ln_closed)) AS max_abs_error,
       count(*) FILTER (WHERE unit_kind <> 'head') AS n_unit_rows,
       count(*) FILTER (WHERE condition <> '') AS n_conditioned_rows
FROM self_repair
GROUP BY model, ablation
ORDER BY model, ablation;
