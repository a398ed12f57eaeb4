-- One head's top tokens in their text
-- Per model, the `n` tokens of the ablated head (layer, head) with the largest clean DE
-- among its top p% (ties to the lower token_index), each with the `context` tokens before
-- and after it, its clean DE, logit change and self-repair: the page's token list.
-- param layer — layer of the ablated head (or head=L26H6 for both)
-- param head — head index
-- param p: 0.02 — fraction of each model's tokens kept per head
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
-- param n: 10 — tokens shown per model
-- param context: 12 — tokens of text shown before and after each token
SELECT model, token_index, row, pos, before, token, after, de_clean, d_logit, sr
FROM (
    SELECT s.model, s.token_index, c.row, c.pos, c.before, c.token, c.after, s.de_clean, s.d_logit, s.sr,
           row_number() OVER (PARTITION BY s.model ORDER BY s.de_clean DESC, s.token_index) AS shown
    FROM self_repair_top($p) s
    JOIN token_context($context) c USING (model, token_index)
    WHERE s.layer = $layer AND s.head = $head AND s.ablation = $ablation AND s.sample = $sample
      AND s.condition = '' AND s.unit_kind = 'head'
)
WHERE shown <= $n
ORDER BY model, de_clean DESC, token_index;
