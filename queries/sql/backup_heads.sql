-- Backup components of one head
-- Downstream heads and MLPs (from repair_sources, top p% tokens of the ablated head)
-- ranked by their mean change in DE, with share = mean(d_de) / mean(clean DE of the
-- ablated head) over the same tokens (ratio of means).
-- param layer — layer of the ablated head
-- param head — head index
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
-- param limit: 20 — components kept per model
SELECT r.model,
       CASE WHEN r.src_kind = 'mlp' THEN 'MLP' || r.src_layer
            ELSE 'L' || r.src_layer || 'H' || r.src_head END AS component,
       r.src_kind,
       r.src_layer,
       r.src_head,
       count(*) AS n_tokens,
       avg(r.d_de) AS d_de,
       avg(r.d_de) / nullif(avg(h.de), 0) AS share,
       row_number() OVER (PARTITION BY r.model ORDER BY avg(r.d_de) DESC, r.src_layer, r.src_head) AS rank
FROM repair_sources r
JOIN head_effects h USING (model, layer, head, token_index)
WHERE r.layer = $layer AND r.head = $head AND r.ablation = $ablation AND r.sample = $sample
GROUP BY r.model, r.src_kind, r.src_layer, r.src_head
QUALIFY rank <= $limit
ORDER BY r.model, rank;
