-- The top neuron of each token: clean against ablated DE (authors' statistic)
-- Over one head's top floor(top_p * N) tokens by signed sr_mlps (d_de_mlps, largest first),
-- Rushing & Nanda's token set: the final-MLP neuron whose change in DE ranks first (rank 1 by
-- signed de_ablated - de_clean among all neurons), its clean and ablated DE, and the final
-- MLP's clean DE on the token (their colour). Refuses when the ingest stored no neuron rows for
-- those tokens (ingest option --sr-mlps-neurons).
-- needs: neuron_ranks
-- param layer — layer of the ablated head
-- param head — head index
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
WITH sel AS (
    SELECT * FROM sr_mlps_top($ablation, $sample, $layer, $head)
)
SELECT s.model,
       s.token_index,
       n.neuron,
       n.de_clean::DOUBLE AS de_clean,
       n.de_ablated::DOUBLE AS de_ablated,
       n.de_ablated::DOUBLE - n.de_clean::DOUBLE AS repair,
       f.de::DOUBLE AS final_mlp_de,
       s.sr_mlps
FROM sel s
JOIN neuron_effects n
  ON n.model = s.model AND n.layer = s.layer AND n.head = s.head AND n.token_index = s.token_index
JOIN models m ON m.model = s.model
JOIN mlp_effects f ON f.model = s.model AND f.token_index = s.token_index AND f.layer = m.n_layers - 1
WHERE n.ablation = $ablation AND n.sample = $sample AND n.rank = 1 AND n.condition = '' AND n.unit_kind = 'head'
ORDER BY s.model, s.token_index;
