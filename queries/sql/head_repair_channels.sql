-- Repair channels per unit: final norm, intermediate norms, attention moving, the rest
-- Over each unit's top p% tokens that have counterfactual re-runs (`--counterfactuals`), the mean of
-- each repair channel (repair_channels): ln_final the final norm (closed form, as sr_ln),
-- ln_intermediate the other norms (d_logit − d_logit[frozen-norms] less ln_final), attention the
-- patterns moving (d_logit − d_logit[frozen-attention]), rest what is left of sr; each also as a
-- share of the unit's mean clean DE (ratio of means). A channel whose counterfactual was not
-- ingested is NULL. n_left_out counts the unit's top tokens without every stored re-run (a re-run
-- that overflowed float32 is never stored: counterfactual_coverage).
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
-- param condition: none — the condition's label (none: units ablated alone)
WITH top AS (
    SELECT model, unit, count(*) AS n_top
    FROM ablation_top
    WHERE ablation = $ablation AND sample = $sample
      AND condition = CASE WHEN $condition = 'none' THEN '' ELSE $condition END
    GROUP BY ALL
)
SELECT model,
       unit,
       unit_kind,
       layer,
       head_label,
       count(*) AS n_tokens,
       any_value(top.n_top) - count(*) AS n_left_out,
       avg(de_clean) AS de_clean,
       avg(d_logit) AS d_logit,
       avg(sr) AS sr,
       avg(ln_final) AS ln_final,
       avg(ln_intermediate) AS ln_intermediate,
       avg(attention) AS attention,
       avg(rest) AS rest,
       avg(ln_final) / nullif(avg(de_clean), 0) AS ln_final_share,
       avg(ln_intermediate) / nullif(avg(de_clean), 0) AS ln_intermediate_share,
       avg(attention) / nullif(avg(de_clean), 0) AS attention_share,
       avg(rest) / nullif(avg(de_clean), 0) AS rest_share
FROM repair_channels
LEFT JOIN top USING (model, unit)
WHERE ablation = $ablation AND sample = $sample
  AND condition = CASE WHEN $condition = 'none' THEN '' ELSE $condition END
GROUP BY model, unit, unit_kind, layer, head, head_label
ORDER BY model, layer, head NULLS LAST, unit;
