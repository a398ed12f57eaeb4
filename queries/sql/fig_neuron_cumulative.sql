-- Cumulative share of absolute neuron repair against rank
-- Final-MLP neurons kept for the ablated head's top p% tokens (neuron_effects), ranked by
-- their total absolute repair sum(|de_ablated - de_clean|) over those tokens; the running
-- share of the total, and each neuron's median clean DE (negative: it erased the correct
-- token on the clean run, so its repair is anti-erasure).
-- param layer — layer of the ablated head
-- param head — head index
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
WITH per_neuron AS (
    SELECT model,
           neuron,
           count(*) AS n_tokens,
           sum(abs(de_ablated::DOUBLE - de_clean::DOUBLE)) AS abs_repair,
           sum(de_ablated::DOUBLE - de_clean::DOUBLE) AS repair,
           median(de_clean::DOUBLE) AS median_de_clean
    FROM neuron_effects
    WHERE layer = $layer AND head = $head AND ablation = $ablation AND sample = $sample
    GROUP BY model, neuron
)
SELECT model,
       row_number() OVER (PARTITION BY model ORDER BY abs_repair DESC, neuron) AS rank,
       neuron,
       n_tokens,
       abs_repair,
       repair,
       median_de_clean,
       sum(abs_repair) OVER (PARTITION BY model ORDER BY abs_repair DESC, neuron
                             ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
           / nullif(sum(abs_repair) OVER (PARTITION BY model), 0) AS cumulative_share
FROM per_neuron
ORDER BY model, rank;
