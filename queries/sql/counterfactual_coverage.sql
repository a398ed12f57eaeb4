-- Counterfactual re-runs stored against each unit's top tokens
-- Per model, ablation, draw, condition and counterfactual: the units' top-p% tokens
-- (ablation_top), the re-runs stored for them (counterfactual_effects), and those left out. A
-- re-run whose values overflow float32 is never stored: under frozen norms nothing rescales the
-- residual, and on some models (SmolLM2's early heads) it grows past float32's range within a
-- few layers. repair_channels holds only tokens with every stored counterfactual.
-- needs: counterfactuals
WITH cf AS (
    SELECT DISTINCT model, counterfactual FROM counterfactual_effects
)
SELECT a.model,
       a.ablation,
       a.sample,
       a.condition,
       cf.counterfactual,
       count(*) AS n_top,
       count(r.token_index) AS n_stored,
       count(*) - count(r.token_index) AS n_missing
FROM ablation_top a
JOIN cf USING (model)
LEFT JOIN counterfactual_effects r
  ON r.model = a.model AND r.ablation = a.ablation AND r.sample = a.sample AND r.condition = a.condition
 AND r.unit = a.unit AND r.token_index = a.token_index AND r.counterfactual = cf.counterfactual
GROUP BY ALL
ORDER BY ALL;
