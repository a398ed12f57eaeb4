-- One unit's effects along the text of its top tokens
-- Per model, every prediction of each row that holds one of the `n` tokens the unit page shows
-- (the unit's top p% with the largest baseline DE, as unit_page_tokens), with its input and
-- predicted token and the unit's baseline DE, logit change and self-repair there (NULL where the
-- unit's ablation was not stored for that token): the page draws the text coloured by them.
-- param unit — the unit's label, e.g. MLP9, ATTN9, BLOCK9, L9H6, L9H6+L9H9 or a group's name
-- param condition: none — the condition's label (none: the unit ablated alone)
-- param p: 0.02 — fraction of each model's tokens kept per unit
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
-- param n: 10 — tokens shown per model
WITH shown AS (
    SELECT model, token_index
    FROM self_repair_top($p)
    WHERE unit = $unit AND condition = CASE WHEN $condition = 'none' THEN '' ELSE $condition END
      AND ablation = $ablation AND sample = $sample
    QUALIFY row_number() OVER (PARTITION BY model ORDER BY de_clean DESC, token_index) <= $n
), rows AS (
    SELECT DISTINCT t.model, t.row
    FROM shown JOIN tokens t USING (model, token_index)
)
SELECT t.model, t.row, t.pos, t.token_index, t.token_str, t.next_token_str, s.de_clean, s.d_logit, s.sr
FROM rows r
JOIN tokens t ON t.model = r.model AND t.row = r.row
LEFT JOIN self_repair s
       ON s.model = t.model AND s.token_index = t.token_index AND s.unit = $unit
      AND s.condition = CASE WHEN $condition = 'none' THEN '' ELSE $condition END
      AND s.ablation = $ablation AND s.sample = $sample
ORDER BY t.model, t.row, t.pos;
