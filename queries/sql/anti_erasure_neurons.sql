-- Anti-erasure neurons of one head
-- Final-MLP neurons (from neuron_effects, top p% tokens of the ablated head) ranked by
-- their total repair, sum(de_ablated - de_clean). n_anti_erasure counts the tokens where
-- the neuron erased (clean DE < 0) and the ablation made its DE rise (repair > 0).
-- param layer — layer of the ablated head
-- param head — head index
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
-- param limit: 20 — neurons kept per model
WITH ranked AS (
    SELECT model,
           neuron,
           count(*) AS n_tokens,
           avg(de_clean) AS de_clean,
           avg(de_ablated - de_clean) AS mean_repair,
           sum(de_ablated - de_clean) AS total_repair,
           count(*) FILTER (WHERE de_clean < 0 AND de_ablated - de_clean > 0) AS n_anti_erasure,
           row_number() OVER (PARTITION BY model ORDER BY sum(de_ablated - de_clean) DESC, neuron) AS rank
    FROM neuron_effects
    WHERE layer = $layer AND head = $head AND ablation = $ablation AND sample = $sample
      AND condition = '' AND unit_kind = 'head'
    GROUP BY model, neuron
)
SELECT * FROM ranked
WHERE rank <= $limit
ORDER BY model, rank;
