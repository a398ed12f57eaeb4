-- How much of each head's self-repair the final MLP explains
-- For every head of one layer (layer -1: the penultimate layer, n_layers - 2), over its
-- top p% tokens (those in repair_sources): mean self-repair, the final MLP's mean change
-- in DE, and final_mlp_share = mean(final MLP d_de) / mean(sr), a ratio of means.
-- param layer: -1 — layer of the ablated heads, -1 for the penultimate layer
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
WITH target AS (
    SELECT model,
           CASE WHEN $layer < 0 THEN n_layers - 2 ELSE $layer END AS layer,
           n_layers - 1 AS final_layer
    FROM models
),
mlp AS (
    SELECT r.model, r.layer, r.head, r.token_index, r.d_de::DOUBLE AS final_mlp
    FROM repair_sources r
    JOIN target t ON r.model = t.model AND r.layer = t.layer
    WHERE r.src_kind = 'mlp' AND r.src_layer = t.final_layer
      AND r.ablation = $ablation AND r.sample = $sample AND r.condition = '' AND r.unit_kind = 'head'
)
SELECT m.model,
       m.layer,
       m.head,
       count(*) AS n_tokens,
       avg(s.de_clean) AS de_clean,
       avg(s.sr) AS sr,
       avg(m.final_mlp) AS final_mlp,
       avg(m.final_mlp) / nullif(avg(s.sr), 0) AS final_mlp_share
FROM mlp m
JOIN self_repair s
  ON s.model = m.model AND s.layer = m.layer AND s.head = m.head AND s.token_index = m.token_index
WHERE s.ablation = $ablation AND s.sample = $sample AND s.condition = '' AND s.unit_kind = 'head'
GROUP BY m.model, m.layer, m.head
ORDER BY m.model, m.layer, m.head;
