-- Anti-erasure neurons of one unit
-- Final-MLP neurons (from neuron_effects, the unit's detail tokens) ranked by their total
-- repair, sum(de_ablated - de_clean). n_anti_erasure counts the tokens where the neuron
-- erased (clean DE < 0) and the ablation made its DE rise (repair > 0). A unit holding the
-- final MLP (MLPn-1, BLOCKn-1) has no neuron rows. anti_erasure_neurons for any unit.
-- param unit — the unit's label, e.g. MLP9, ATTN9, BLOCK9, L9H6, L9H6+L9H9 or a group's name
-- param condition: none — the condition's label (none: the unit ablated alone)
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
    WHERE unit = $unit AND condition = CASE WHEN $condition = 'none' THEN '' ELSE $condition END
      AND ablation = $ablation AND sample = $sample
    GROUP BY model, neuron
)
SELECT * FROM ranked
WHERE rank <= $limit
ORDER BY model, rank;
