-- Neuron sparsity of one head's final-MLP repair
-- On the ablated head's top p% tokens by clean DE, the final-MLP neurons of each token ranked
-- by signed repair = de_ablated - de_clean among all neurons (neuron_effects.rank), as Rushing
-- & Nanda did. For N = 1 … max_rank and X in 50, 10, 5, 2.5, 1 percent: the share of the head's
-- tokens on which the N-th largest repair exceeds X% of the head's clean DE on that token.
-- needs: neuron_ranks
-- param layer — layer of the ablated head
-- param head — head index
-- param p: 0.02 — the ingest's top_p (the tokens with neuron rows)
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
-- param max_rank: 50 — largest N (at most the ingest's neurons_top_k)
WITH tokens AS (
    SELECT model, layer, head, token_index, de::DOUBLE AS de
    FROM top_tokens($p)
    WHERE layer = $layer AND head = $head
),
repair AS (
    SELECT n.model, n.token_index, n.rank AS n_rank, t.de,
           n.de_ablated::DOUBLE - n.de_clean::DOUBLE AS repair
    FROM neuron_effects n
    JOIN tokens t USING (model, layer, head, token_index)
    WHERE n.ablation = $ablation AND n.sample = $sample AND n.rank <= $max_rank
      AND n.condition = '' AND n.unit_kind = 'head'
),
token_counts AS (
    SELECT model, count(DISTINCT token_index) AS n_tokens FROM repair GROUP BY model
),
ranks AS (
    SELECT range AS n_rank FROM range(1, $max_rank + 1)
),
thresholds AS (
    SELECT threshold_pct::DOUBLE AS threshold_pct
    FROM (VALUES (50.0), (10.0), (5.0), (2.5), (1.0)) AS t(threshold_pct)
)
SELECT t.model,
       r.n_rank,
       x.threshold_pct,
       t.n_tokens,
       count(p.token_index) AS n_exceeding,
       count(p.token_index) / t.n_tokens AS share
FROM token_counts t
CROSS JOIN ranks r
CROSS JOIN thresholds x
LEFT JOIN repair p
       ON p.model = t.model AND p.n_rank = r.n_rank AND p.repair > x.threshold_pct / 100 * p.de
GROUP BY t.model, r.n_rank, x.threshold_pct, t.n_tokens
ORDER BY t.model, x.threshold_pct DESC, r.n_rank;
