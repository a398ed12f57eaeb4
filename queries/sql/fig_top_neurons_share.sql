-- How much of the final MLP's repair its top neurons explain
-- For every head of one layer (layer -1: the penultimate layer), over its top p% tokens:
-- the final MLP's mean change in DE (repair_sources), the mean summed repair of the top_n
-- neurons of each token (ranked by de_ablated - de_clean, from neuron_effects), and
-- top_share = mean(top neurons) / mean(final MLP), a ratio of means.
-- param layer: -1 — layer of the ablated heads, -1 for the penultimate layer
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
-- param top_n: 5 — neurons per token
WITH target AS (
    SELECT model,
           CASE WHEN $layer < 0 THEN n_layers - 2 ELSE $layer END AS layer,
           n_layers - 1 AS final_layer
    FROM models
),
ranked AS (
    SELECT n.model, n.layer, n.head, n.token_index,
           n.de_ablated::DOUBLE - n.de_clean::DOUBLE AS repair,
           row_number() OVER (PARTITION BY n.model, n.layer, n.head, n.token_index
                              ORDER BY n.de_ablated::DOUBLE - n.de_clean::DOUBLE DESC, n.neuron) AS rank
    FROM neuron_effects n
    JOIN target t ON n.model = t.model AND n.layer = t.layer
    WHERE n.ablation = $ablation AND n.sample = $sample AND n.condition = '' AND n.unit_kind = 'head'
),
top AS (
    SELECT model, layer, head, token_index, sum(repair) FILTER (WHERE rank <= $top_n) AS top_neurons
    FROM ranked
    GROUP BY model, layer, head, token_index
),
mlp AS (
    SELECT r.model, r.layer, r.head, r.token_index, r.d_de::DOUBLE AS final_mlp
    FROM repair_sources r
    JOIN target t ON r.model = t.model AND r.layer = t.layer
    WHERE r.src_kind = 'mlp' AND r.src_layer = t.final_layer
      AND r.ablation = $ablation AND r.sample = $sample AND r.condition = '' AND r.unit_kind = 'head'
)
SELECT model,
       layer,
       head,
       count(*) AS n_tokens,
       avg(final_mlp) AS final_mlp,
       avg(top_neurons) AS top_neurons,
       avg(top_neurons) / nullif(avg(final_mlp), 0) AS top_share
FROM mlp
JOIN top USING (model, layer, head, token_index)
GROUP BY model, layer, head
ORDER BY model, layer, head;
