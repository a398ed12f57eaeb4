-- How often each final-MLP neuron is among a token's top repairers
-- For the ablated head's top p% tokens (neuron_effects), rank each token's neurons by
-- repair de_ablated - de_clean; frequency = the share of tokens on which the neuron is in
-- the top top_n. The most frequent `limit` neurons per model.
-- param layer — layer of the ablated head
-- param head — head index
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
-- param top_n: 10 — top neurons per token
-- param limit: 30 — neurons kept per model
WITH ranked AS (
    SELECT model, token_index, neuron,
           row_number() OVER (PARTITION BY model, token_index
                              ORDER BY de_ablated::DOUBLE - de_clean::DOUBLE DESC, neuron) AS token_rank
    FROM neuron_effects
    WHERE layer = $layer AND head = $head AND ablation = $ablation AND sample = $sample
),
token_counts AS (
    SELECT model, count(DISTINCT token_index) AS n_tokens FROM ranked GROUP BY model
)
SELECT r.model,
       r.neuron,
       count(*) AS n_top,
       t.n_tokens,
       count(*) / t.n_tokens AS frequency,
       row_number() OVER (PARTITION BY r.model ORDER BY count(*) DESC, r.neuron) AS rank
FROM ranked r
JOIN token_counts t USING (model)
WHERE r.token_rank <= $top_n
GROUP BY r.model, r.neuron, t.n_tokens
QUALIFY rank <= $limit
ORDER BY r.model, rank;
