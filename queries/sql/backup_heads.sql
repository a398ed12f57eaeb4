-- Backup components of one head, both signs
-- Downstream heads and MLPs (from repair_sources, top p% tokens of the ablated head)
-- ranked by their mean change in DE: the `limit` strongest that repair (d_de > 0) and
-- the `limit` strongest that work against the repair (d_de < 0), with
-- share = mean(d_de) / mean(clean DE of the ablated head) over the same tokens (ratio of
-- means), and each direction's total over all of its components, shown or not.
-- param layer — layer of the ablated head (or head=L26H6 for both)
-- param head — head index
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
           avg(r.d_de) / nullif(avg(h.de), 0) AS share
    FROM repair_sources r
    JOIN head_effects h USING (model, layer, head, token_index)
    WHERE r.layer = $layer AND r.head = $head AND r.ablation = $ablation AND r.sample = $sample
      AND r.condition = '' AND r.unit_kind = 'head'
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
