-- Cumulative share of final-MLP repair against neuron rank
-- On the ablated head's top p% tokens by clean DE, Rushing & Nanda's curve: per token, the
-- summed repair (de_ablated - de_clean) of its N top neurons by signed repair (neuron_effects
-- .rank <= N) over the summed |repair| of all final-MLP neurons (neuron_totals.d_de_abs_sum),
-- averaged over the tokens, for N = 1 … max_rank.
-- needs: neuron_ranks
-- param layer — layer of the ablated head
-- param head — head index
-- param p: 0.02 — the ingest's top_p (the tokens with neuron rows)
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
-- param max_rank: 50 — largest N (at most the ingest's neurons_top_k)
WITH totals AS (
    SELECT n.model, n.layer, n.head, n.token_index, n.d_de_abs_sum::DOUBLE AS abs_total
    FROM neuron_totals n
    JOIN top_tokens($p) t USING (model, layer, head, token_index)
    WHERE n.layer = $layer AND n.head = $head AND n.ablation = $ablation AND n.sample = $sample
      AND n.condition = '' AND n.unit_kind = 'head'
),
running AS (
    SELECT n.model, n.token_index, n.rank AS n_rank,
           sum(n.de_ablated::DOUBLE - n.de_clean::DOUBLE)
               OVER (PARTITION BY n.model, n.token_index ORDER BY n.rank) / t.abs_total AS share
    FROM neuron_effects n
    JOIN totals t USING (model, layer, head, token_index)
    WHERE n.ablation = $ablation AND n.sample = $sample AND n.rank <= $max_rank
      AND n.condition = '' AND n.unit_kind = 'head'
)
SELECT model,
       n_rank,
       count(*) AS n_tokens,
       avg(share) AS cumulative_share
FROM running
GROUP BY model, n_rank
ORDER BY model, n_rank;
