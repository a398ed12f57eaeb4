-- Units ranked by an output metric
-- Per model and stored unit (alone, or under the condition given), the means over every stored
-- token of the logit change and the output metrics of DESIGN.md (d_loss, kl = KL(baseline ‖
-- ablated), d_entropy, and top1_changed as the fraction of tokens whose top-1 prediction
-- flips), ranked by `metric`, largest effect first: d_logit most negative first, the others
-- largest first. `value` is the ranked metric's mean, `rank` its place. Where the logit metric
-- and the whole distribution disagree, the ranks by d_logit and by kl differ.
-- param metric: kl — the ranking metric: d_logit, d_loss, kl, d_entropy or top1_changed
-- param condition: none — the condition's label (none: the units ablated alone)
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
-- needs: output_metrics
WITH means AS (
    SELECT s.model, s.unit, s.unit_kind, s.condition, s.layer, s.head,
           count(*) AS n_tokens,
           avg(s.d_logit) AS d_logit,
           avg(s.d_loss) AS d_loss,
           avg(s.kl) AS kl,
           avg(s.d_entropy) AS d_entropy,
           avg(s.top1_changed::DOUBLE) AS top1_changed
    FROM self_repair s
    WHERE s.condition = CASE WHEN $condition = 'none' THEN '' ELSE $condition END
      AND s.ablation = $ablation AND s.sample = $sample
    GROUP BY ALL
), ranked AS (
    SELECT *,
           CASE $metric WHEN 'd_logit' THEN d_logit WHEN 'd_loss' THEN d_loss WHEN 'kl' THEN kl
                        WHEN 'd_entropy' THEN d_entropy WHEN 'top1_changed' THEN top1_changed
                        ELSE error('metric ' || $metric || ' is not one of d_logit, d_loss, kl, d_entropy, '
                                   || 'top1_changed') END AS value
    FROM means
)
SELECT model, unit, unit_kind, condition, layer, head, n_tokens, $metric AS metric, value,
       row_number() OVER (PARTITION BY model
                          ORDER BY CASE WHEN $metric = 'd_logit' THEN value ELSE -value END, unit) AS rank,
       d_logit, d_loss, kl, d_entropy, top1_changed
FROM ranked
ORDER BY model, rank;
