-- Every token of one head
-- Per token of the ablated head (layer, head): clean and ablated DE, logit change,
-- self-repair and its parts, ln_ratio, and whether the token is in the head's top p%.
-- param layer — layer of the ablated head
-- param head — head index
-- param p: 0.02 — fraction of each model's tokens kept per head (for is_top)
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
SELECT s.model,
       s.token_index,
       t.row,
       t.pos,
       t.token_str,
       t.next_token_str,
       s.de_clean,
       s.de_ablated,
       s.d_de,
       s.d_logit,
       s.sr,
       s.sr_heads,
       s.sr_mlps,
       s.sr_ln,
       s.ln_ratio,
       top.token_index IS NOT NULL AS is_top
FROM self_repair s
JOIN tokens t USING (model, token_index)
LEFT JOIN top_tokens($p) top USING (model, layer, head, token_index)
WHERE s.layer = $layer AND s.head = $head
  AND s.ablation = $ablation AND s.sample = $sample AND s.condition = '' AND s.unit_kind = 'head'
ORDER BY s.model, s.de_clean DESC, s.token_index;
