-- Backup map: which downstream components make up each head's loss
-- For every ablated head and every downstream head or MLP (repair_sources, the ablated
-- head's top p% tokens): the mean change in the component's DE and share = mean(d_de) /
-- mean(clean DE of the ablated head) over the same tokens (ratio of means).
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
SELECT r.model,
       r.layer,
       r.head,
       r.src_kind,
       r.src_layer,
       r.src_head,
       CASE WHEN r.src_kind = 'mlp' THEN 'MLP' || r.src_layer
            ELSE 'L' || r.src_layer || 'H' || r.src_head END AS component,
       count(*) AS n_tokens,
       avg(r.d_de) AS d_de,
       avg(r.d_de) / nullif(avg(h.de), 0) AS share
FROM repair_sources r
JOIN head_effects h USING (model, layer, head, token_index)
WHERE r.ablation = $ablation AND r.sample = $sample AND r.condition = '' AND r.unit_kind = 'head'
GROUP BY r.model, r.layer, r.head, r.src_kind, r.src_layer, r.src_head
ORDER BY r.model, r.layer, r.head, r.src_layer, r.src_kind, r.src_head;
