-- Share of MLP repair from each token's top neurons (authors' statistic)
-- For every head of one layer (layer -1: the penultimate layer), over its top floor(top_p * N)
-- tokens by signed sr_mlps (d_de_mlps, every MLP layer; largest first), Rushing & Nanda's token
-- set: per token, the summed change in DE of the top_n final-MLP neurons by signed change
-- (rank <= top_n) over sr_mlps, capped at 3 (300%) with no lower clip, averaged. Refuses when
-- the ingest stored no neuron rows for those tokens (ingest option --sr-mlps-neurons).
-- needs: neuron_ranks
-- param layer: -1 — layer of the ablated heads, -1 for the penultimate layer
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
-- param top_n: 5 — neurons per token (at most the ingest's neurons_top_k)
WITH sel AS (
    SELECT * FROM sr_mlps_top($ablation, $sample, $layer, -1)
),
top AS (
    SELECT model, layer, head, token_index,
           sum(de_ablated::DOUBLE - de_clean::DOUBLE) AS top_neurons
    FROM neuron_effects
    WHERE ablation = $ablation AND sample = $sample AND rank <= $top_n
      AND condition = '' AND unit_kind = 'head'
    GROUP BY ALL
)
SELECT s.model,
       s.layer,
       s.head,
       count(*) AS n_tokens,
       avg(s.sr_mlps) AS sr_mlps,
       avg(t.top_neurons) AS top_neurons,
       avg(least(t.top_neurons / s.sr_mlps, 3)) AS top_share
FROM sel s
JOIN top t USING (model, layer, head, token_index)
GROUP BY s.model, s.layer, s.head
ORDER BY s.model, s.layer, s.head;
