-- Conditional growth of every stored unit under every stored condition
-- For each stored (unit U, condition U0) pair, per model and ablation: the mean d_logit of U
-- ablated alone, the mean d_logit of U ablated on top of U0 (against the U0-ablated run), and
-- their difference, growth = given - alone (DESIGN.md, "Conditions"). Both over the tokens
-- both rows cover (every stored draw, matched by draw and token), and over those of them in
-- U0's top p% tokens at the ingest's top_p (floor(top_p * N) by U0's signed clean DE, the sum
-- of its components', ties to the lower token_index). Ranked by growth on those top tokens,
-- most negative first: ablating a unit the model relies on lowers the correct logit (d_logit < 0),
-- so a dormant backup (d_logit near 0 alone, well below 0 once U0 is gone) has the most negative
-- growth and comes first. The same for the output metrics d_loss and kl (DESIGN.md): a dormant
-- backup's loss change and KL grow once U0 is gone (positive growth).
-- NULL means: U alone is not stored, or no token is shared (or, for d_loss and kl, the store
-- holds no output metrics: --output-metrics none, or a selfrepair before them).
WITH pairs AS (
    SELECT DISTINCT model, ablation, condition, unit, unit_kind
    FROM stored_units
    WHERE condition <> ''
),
given AS (
    SELECT a.model, a.ablation, a.sample, a.condition, a.unit, a.token_index, a.d_logit::DOUBLE AS d_logit,
           a.d_loss::DOUBLE AS d_loss, a.kl::DOUBLE AS kl
    FROM ablation_effects a
    JOIN pairs p USING (model, ablation, condition, unit)
),
alone AS (
    SELECT a.model, a.ablation, a.sample, p.condition, a.unit, a.token_index, a.d_logit::DOUBLE AS d_logit,
           a.d_loss::DOUBLE AS d_loss, a.kl::DOUBLE AS kl
    FROM ablation_effects a
    JOIN pairs p ON p.model = a.model AND p.ablation = a.ablation AND p.unit = a.unit
    WHERE a.condition = ''
),
-- The condition's clean DE per token: the sum of its components' (unit_members).
condition_de AS (
    SELECT u.model, u.unit AS condition, c.token_index, sum(c.de::DOUBLE) AS de
    FROM unit_members u
    JOIN (SELECT model, 'head' AS component, layer, head, token_index, de FROM head_effects
          UNION ALL
          SELECT model, 'mlp' AS component, layer, -1 AS head, token_index, de FROM mlp_effects) c
      USING (model, component, layer, head)
    WHERE (u.model, u.unit) IN (SELECT model, condition FROM pairs)
    GROUP BY ALL
),
condition_top AS (
    SELECT d.model, d.condition, d.token_index
    FROM condition_de d
    JOIN models m USING (model)
    QUALIFY row_number() OVER (PARTITION BY d.model, d.condition ORDER BY d.de DESC, d.token_index)
            <= floor(m.top_p * m.n_tokens)
),
matched AS (
    SELECT g.model, g.ablation, g.condition, g.unit, g.token_index,
           a.d_logit AS alone, g.d_logit AS given,
           t.token_index IS NOT NULL AS is_top,
           a.d_loss AS d_loss_alone, g.d_loss AS d_loss_given, a.kl AS kl_alone, g.kl AS kl_given
    FROM given g
    JOIN alone a USING (model, ablation, sample, condition, unit, token_index)
    LEFT JOIN condition_top t USING (model, condition, token_index)
)
SELECT p.model,
       p.ablation,
       p.unit,
       p.unit_kind,
       p.condition,
       count(*) FILTER (WHERE m.is_top) AS n_top,
       avg(m.alone) FILTER (WHERE m.is_top) AS d_logit_alone_top,
       avg(m.given) FILTER (WHERE m.is_top) AS d_logit_given_top,
       avg(m.given) FILTER (WHERE m.is_top) - avg(m.alone) FILTER (WHERE m.is_top) AS growth_top,
       count(m.token_index) AS n_all,
       avg(m.alone) AS d_logit_alone,
       avg(m.given) AS d_logit_given,
       avg(m.given) - avg(m.alone) AS growth,
       avg(m.d_loss_given) FILTER (WHERE m.is_top) - avg(m.d_loss_alone) FILTER (WHERE m.is_top) AS d_loss_growth_top,
       avg(m.kl_given) FILTER (WHERE m.is_top) - avg(m.kl_alone) FILTER (WHERE m.is_top) AS kl_growth_top,
       avg(m.d_loss_alone) AS d_loss_alone,
       avg(m.d_loss_given) AS d_loss_given,
       avg(m.d_loss_given) - avg(m.d_loss_alone) AS d_loss_growth,
       avg(m.kl_alone) AS kl_alone,
       avg(m.kl_given) AS kl_given,
       avg(m.kl_given) - avg(m.kl_alone) AS kl_growth
FROM pairs p
LEFT JOIN matched m USING (model, ablation, condition, unit)
GROUP BY p.model, p.ablation, p.unit, p.unit_kind, p.condition
ORDER BY p.model, p.ablation, growth_top ASC NULLS LAST, growth ASC NULLS LAST, p.unit, p.condition;
