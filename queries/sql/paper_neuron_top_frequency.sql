-- How often each final-MLP neuron is among a token's top neurons (authors' statistic)
-- Over one head's top floor(top_p * N) tokens by signed sr_mlps (d_de_mlps, largest first),
-- Rushing & Nanda's token set: frequency = the share of those tokens on which the neuron's
-- change in DE ranks in the top top_n by sign among all neurons (rank <= top_n). The most
-- frequent `limit` neurons per model. Refuses when the ingest stored no neuron rows for those
-- tokens (ingest option --sr-mlps-neurons).
-- needs: neuron_ranks
-- param layer — layer of the ablated head
-- param head — head index
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
-- param top_n: 10 — top neurons per token (at most the ingest's neurons_top_k)
-- param limit: 30 — neurons kept per model
WITH sel AS (
    SELECT * FROM sr_mlps_top($ablation, $sample, $layer, $head)
),
token_counts AS (
    SELECT model, count(*) AS n_tokens FROM sel GROUP BY model
),
ranked AS (
    SELECT s.model,
           n.neuron,
           count(*) AS n_top,
           c.n_tokens,
           count(*) / c.n_tokens AS frequency,
           row_number() OVER (PARTITION BY s.model ORDER BY count(*) DESC, n.neuron) AS rank
    FROM sel s
    JOIN neuron_effects n
      ON n.model = s.model AND n.layer = s.layer AND n.head = s.head AND n.token_index = s.token_index
    JOIN token_counts c ON c.model = s.model
    WHERE n.ablation = $ablation AND n.sample = $sample AND n.rank <= $top_n
      AND n.condition = '' AND n.unit_kind = 'head'
    GROUP BY s.model, n.neuron, c.n_tokens
)
SELECT * FROM ranked
WHERE rank <= $limit
ORDER BY model, rank;
