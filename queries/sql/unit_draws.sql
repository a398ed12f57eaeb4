-- One unit's self-repair in each resample draw, on the tokens every draw covers
-- Per model and draw, the unit's means over its top p% tokens (by baseline DE, as
-- unit_top_self_repair) that every stored resample draw of it holds, so the draws are compared
-- on the same tokens (a partial store's draws may cover fewer); n_dropped counts the unit's top
-- tokens left out because some draw lacks them. The head page's spread across draws.
-- param unit — the unit's label, e.g. MLP9, ATTN9, BLOCK9, L9H6, L9H6+L9H9 or a group's name
-- param condition: none — the condition's label (none: the unit ablated alone)
-- param p: 0.02 — fraction of each model's tokens kept per unit
WITH facts AS (
    SELECT model, sample, token_index, d_logit, sr, sr_heads, sr_mlps, sr_ln
    FROM self_repair_top($p)
    WHERE unit = $unit AND condition = CASE WHEN $condition = 'none' THEN '' ELSE $condition END
      AND ablation = 'resample'
), draws AS (
    SELECT model, count(DISTINCT sample) AS n_draws, count(DISTINCT token_index) AS n_top
    FROM facts
    GROUP BY model
), common AS (
    SELECT f.model, f.token_index
    FROM facts f JOIN draws d USING (model)
    GROUP BY f.model, f.token_index, d.n_draws
    HAVING count(DISTINCT f.sample) = d.n_draws
)
SELECT f.model,
       f.sample,
       count(*) AS n_tokens,
       avg(f.d_logit) AS d_logit,
       avg(f.sr) AS sr,
       avg(f.sr_heads) AS sr_heads,
       avg(f.sr_mlps) AS sr_mlps,
       avg(f.sr_ln) AS sr_ln,
       any_value(d.n_top) - count(*) AS n_dropped
FROM facts f
JOIN common c USING (model, token_index)
JOIN draws d USING (model)
GROUP BY f.model, f.sample
ORDER BY f.model, f.sample;
