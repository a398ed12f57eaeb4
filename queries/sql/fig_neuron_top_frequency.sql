-- How often each final-MLP neuron is among a token's top repairers
-- On the ablated head's top p% tokens by clean DE: frequency = the share of those tokens on
-- which the neuron's repair de_ablated - de_clean ranks in the top top_n by sign among all
-- final-MLP neurons (neuron_effects.rank). The most frequent `limit` neurons per model. The
-- authors' token set (top sr_mlps) is the query `paper_neuron_top_frequency`.
-- needs: neuron_ranks
-- param layer — layer of the ablated head
-- param head — head index
-- param p: 0.02 — the ingest's top_p (the tokens with neuron rows)
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
-- param top_n: 10 — top neurons per token (at most the ingest's neurons_top_k)
-- param limit: 30 — neurons kept per model
WITH tokens AS (
    SELECT n.model, n.layer, n.head, n.token_index
    FROM neuron_totals n
    JOIN top_tokens($p) t USING (model, layer, head, token_index)
    WHERE n.layer = $layer AND n.head = $head AND n.ablation = $ablation AND n.sample = $sample
      AND n.condition = '' AND n.unit_kind = 'head'
),
token_counts AS (
    SELECT model, count(*) AS n_tokens FROM tokens GROUP BY model
),
ranked AS (
    SELECT n.model,
           n.neuron,
           count(*) AS n_top,
           c.n_tokens,
           count(*) / c.n_tokens AS frequency,
           row_number() OVER (PARTITION BY n.model ORDER BY count(*) DESC, n.neuron) AS rank
    FROM neuron_effects n
    JOIN tokens t USING (model, layer, head, token_index)
    JOIN token_counts c ON c.model = n.model
    WHERE n.ablation = $ablation AND n.sample = $sample AND n.rank <= $top_n
      AND n.condition = '' AND n.unit_kind = 'head'
    GROUP BY n.model, n.neuron, c.n_tokens
)
SELECT * FROM ranked
WHERE rank <= $limit
ORDER BY model, rank;
