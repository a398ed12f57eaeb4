-- One unit's top tokens in their text
-- Per model, the `n` tokens of the ablated unit with the largest baseline DE among its top
-- p% (ties to the lower token_index), each with the `context` tokens before and after it,
-- its baseline DE, logit change and self-repair: the unit page's token list (for any
-- unit, a head too, alone or under a condition).
-- param unit — the unit's label, e.g. MLP9, ATTN9, BLOCK9, L9H6, L9H6+L9H9 or a group's name
-- param condition: none — the condition's label (none: the unit ablated alone)
-- param p: 0.02 — fraction of each model's tokens kept per unit
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
    WHERE s.unit = $unit AND s.condition = CASE WHEN $condition = 'none' THEN '' ELSE $condition END
      AND s.ablation = $ablation AND s.sample = $sample
)
WHERE shown <= $n
ORDER BY model, de_clean DESC, token_index;
