-- Where one head unit attends on its top tokens
-- Per model and top p% token of the head unit (alone or under a condition): the source
-- positions the head attends to most on the clean run (rank 1 = largest weight), how far back
-- each lies and its token; NULL sources where the store kept none. Other unit kinds have no
-- attention rows.
-- param unit — the head's label, e.g. L9H6
-- param condition: none — the condition's label (none: the unit ablated alone)
-- param p: 0.02 — fraction of each model's tokens kept per unit
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
       ON a.model = s.model AND a.unit = s.unit AND a.condition = s.condition AND a.token_index = s.token_index
      AND a.ablation = s.ablation AND a.sample = s.sample
LEFT JOIN tokens t ON t.model = a.model AND t.token_index = a.src_token_index
WHERE s.unit = $unit AND s.condition = CASE WHEN $condition = 'none' THEN '' ELSE $condition END
  AND s.unit_kind = 'head' AND s.ablation = $ablation AND s.sample = $sample
ORDER BY s.model, s.token_index, a.rank;
