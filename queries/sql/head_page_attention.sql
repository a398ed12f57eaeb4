-- Where one head attends on its top tokens
-- Per model and top p% token of the head (layer, head): the source positions it attends
-- to most on the clean run (rank 1 = largest weight), how far back each lies and its token;
-- NULL sources where the store kept no attention (ingested before it was stored).
-- param layer — layer of the ablated head (or head=L26H6 for both)
-- param head — head index
-- param p: 0.02 — fraction of each model's tokens kept per head
-- param ablation: resample — ablation kind whose shards hold the rows (the same in every draw)
-- param sample: 0 — resample draw
SELECT s.model,
       s.token_index,
       a.rank,
       a.src_pos,
       s.token_index - a.src_token_index AS distance,
       a.weight,
       t.token_str AS src_token
FROM self_repair_top($p) s
LEFT JOIN attention_top a
       ON a.model = s.model AND a.layer = s.layer AND a.head = s.head AND a.token_index = s.token_index
      AND a.ablation = s.ablation AND a.sample = s.sample AND a.condition = s.condition AND a.unit = s.unit
LEFT JOIN tokens t ON t.model = a.model AND t.token_index = a.src_token_index
WHERE s.layer = $layer AND s.head = $head AND s.ablation = $ablation AND s.sample = $sample
  AND s.condition = '' AND s.unit_kind = 'head'
ORDER BY s.model, s.token_index, a.rank;
