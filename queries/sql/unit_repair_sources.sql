-- Components outside one unit that repair it, both signs
-- Heads and MLPs outside the ablated unit (from repair_sources: the unit's top p% tokens at
-- the ingest's top_p) ranked by their mean change in DE: the `limit` strongest that repair
-- (d_de > 0) and the `limit` strongest that work against the repair (d_de < 0), with
-- share = mean(d_de) / mean(baseline DE of the unit) over the same tokens (ratio of means;
-- the unit's DE from its own ablation_effects rows), and each direction's total over all of
-- its components, shown or not. backup_heads for any unit, alone or under a condition.
-- param unit — the unit's label, e.g. MLP9, ATTN9, BLOCK9, L9H6, L9H6+L9H9 or a group's name
-- param condition: none — the condition's label (none: the unit ablated alone)
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
-- param limit: 10 — components kept per model and direction
WITH per_component AS (
    SELECT r.model,
           r.src_label AS component,
           r.src_kind,
           r.src_layer,
           r.src_head,
           count(*) AS n_tokens,
           avg(r.d_de) AS d_de,
           avg(r.d_de) / nullif(avg(a.de_base), 0) AS share
    FROM repair_sources r
    JOIN ablation_effects a USING (model, ablation, sample, condition, unit, token_index)
    WHERE r.unit = $unit AND r.condition = CASE WHEN $condition = 'none' THEN '' ELSE $condition END
      AND r.ablation = $ablation AND r.sample = $sample
    GROUP BY ALL
),
ranked AS (
    SELECT *,
           CASE WHEN d_de >= 0 THEN 'repairs' ELSE 'works against' END AS direction,
           sum(d_de) OVER (PARTITION BY model, d_de >= 0) AS direction_total,
           row_number() OVER (PARTITION BY model, d_de >= 0 ORDER BY abs(d_de) DESC, src_layer, src_head) AS rank
    FROM per_component
)
SELECT model, direction, rank, component, src_kind, src_layer, src_head, n_tokens, d_de, share, direction_total
FROM ranked
WHERE rank <= $limit
ORDER BY model, direction, rank;
