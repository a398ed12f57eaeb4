-- Check: direct effects sum to the logit
-- Per token, de_other + sum of head DEs + sum of MLP DEs against logit - unembed_bias
-- (DESIGN.md, tested to 1e-4); the largest absolute error per model. For ablated units:
-- an unconditioned row's de_base (the unit's clean DE) against the sum of its components'
-- clean DEs (head_effects, mlp_effects: a unit's DE is the sum of its components'), and a
-- condition's run (condition_tokens: logit, ln_scale) against the condition unit's own
-- ablation in the same draw (tokens.logit + d_logit, ln_scale), where that row is stored
-- (NULL: no such rows).
WITH heads AS (
    SELECT model, token_index, sum(de::DOUBLE) AS de FROM head_effects GROUP BY ALL
),
mlps AS (
    SELECT model, token_index, sum(de::DOUBLE) AS de FROM mlp_effects GROUP BY ALL
),
clean AS (
    SELECT t.model,
           count(*) AS n_tokens,
           max(abs(t.de_other::DOUBLE + h.de + m.de - (t.logit::DOUBLE - t.unembed_bias::DOUBLE))) AS max_abs_error
    FROM tokens t
    JOIN heads h USING (model, token_index)
    JOIN mlps m USING (model, token_index)
    GROUP BY t.model
),
components AS (
    SELECT model, 'head' AS component, layer, head, token_index, de FROM head_effects
    UNION ALL
    SELECT model, 'mlp' AS component, layer, -1 AS head, token_index, de FROM mlp_effects
),
unit_de AS (
    SELECT u.model, u.unit, c.token_index, sum(c.de::DOUBLE) AS de
    FROM unit_members u
    JOIN components c USING (model, component, layer, head)
    GROUP BY ALL
),
units AS (
    SELECT a.model,
           count(*) AS n_unit_rows,
           max(abs(a.de_base::DOUBLE - d.de)) AS max_abs_error_units
    FROM ablation_effects a
    JOIN unit_de d USING (model, unit, token_index)
    WHERE a.condition = ''
    GROUP BY a.model
),
conditions AS (
    SELECT c.model,
           count(*) AS n_condition_rows,
           max(greatest(abs(c.logit::DOUBLE - (t.logit::DOUBLE + a.d_logit::DOUBLE)),
                        abs(c.ln_scale::DOUBLE - a.ln_scale::DOUBLE))) AS max_abs_error_conditions
    FROM condition_tokens c
    JOIN ablation_effects a
      ON a.model = c.model AND a.ablation = c.ablation AND a.sample = c.sample AND a.condition = ''
     AND a.unit = c.condition AND a.token_index = c.token_index
    JOIN tokens t ON t.model = c.model AND t.token_index = c.token_index
    GROUP BY c.model
)
SELECT clean.model,
       clean.n_tokens,
       clean.max_abs_error,
       coalesce(units.n_unit_rows, 0) AS n_unit_rows,
       units.max_abs_error_units,
       coalesce(conditions.n_condition_rows, 0) AS n_condition_rows,
       conditions.max_abs_error_conditions
FROM clean
LEFT JOIN units USING (model)
LEFT JOIN conditions USING (model)
ORDER BY clean.model;
