-- The top repairing neuron of each token: clean against ablated DE
-- For each of the ablated head's top p% tokens (neuron_effects), the final-MLP neuron with
-- the largest repair de_ablated - de_clean, with its clean and ablated DE. Points with
-- de_clean < 0 moving toward 0 are anti-erasure: the neuron erased less once the head was gone.
-- param layer — layer of the ablated head
-- param head — head index
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
SELECT n.model,
       n.token_index,
       n.neuron,
       n.de_clean::DOUBLE AS de_clean,
       n.de_ablated::DOUBLE AS de_ablated,
       n.de_ablated::DOUBLE - n.de_clean::DOUBLE AS repair,
       h.de::DOUBLE AS head_de
FROM neuron_effects n
JOIN head_effects h USING (model, layer, head, token_index)
WHERE n.layer = $layer AND n.head = $head AND n.ablation = $ablation AND n.sample = $sample
  AND n.condition = '' AND n.unit_kind = 'head'
QUALIFY row_number() OVER (PARTITION BY n.model, n.token_index
                           ORDER BY n.de_ablated::DOUBLE - n.de_clean::DOUBLE DESC, n.neuron) = 1
ORDER BY n.model, n.token_index;
