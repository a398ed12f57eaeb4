-- Self-repair of one unit on its top tokens
-- Per model, means over the unit's top p% tokens (by its signed clean DE, the sum of its
-- components'; a head's as head_top_self_repair) of the baseline and ablated DE, the logit
-- change, self-repair and its heads/MLPs/LayerNorm split (components outside the unit), the
-- ln_ratio, and the output metrics (d_loss, kl, d_entropy, the fraction of tokens whose top-1
-- prediction flips; NULL where the store holds none). Under a condition the baseline is the
-- condition-ablated run and the tokens are the unit alone's. `unit` is the stored label (a named group's name).
-- Each mean has a confidence interval (*_ci_low, *_ci_high) at the given level: a seeded
-- Poisson bootstrap over rows (tokens of one row are correlated), n_boot replicates
-- (queries/bootstrap.py).
-- param unit — the unit's label, e.g. MLP9, ATTN9, BLOCK9, L9H6, L9H6+L9H9 or a group's name
-- param condition: none — the condition's label (none: the unit ablated alone)
-- param p: 0.02 — fraction of each model's tokens kept per unit
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
-- param level: 0.95 — confidence level of the *_ci_low and *_ci_high columns
-- param seed: 0 — seed of the bootstrap over rows
-- param n_boot: 200 — bootstrap replicates
WITH facts AS (
    SELECT s.model, s.unit, s.unit_kind, s.condition, s.layer, s.head, t.row, s.de_clean, s.de_ablated, s.d_logit,
           s.sr, s.sr_heads, s.sr_mlps, s.sr_ln, s.ln_ratio, s.d_loss, s.kl, s.d_entropy, s.top1_changed
    FROM self_repair_top($p) s
    JOIN tokens t USING (model, token_index)
    WHERE s.unit = $unit AND s.condition = CASE WHEN $condition = 'none' THEN '' ELSE $condition END
      AND s.ablation = $ablation AND s.sample = $sample
), long AS (
    -- one value per token and quantity, for the bootstrap (queries/bootstrap.py `boot_ci`)
    UNPIVOT (SELECT model, 0 AS g, row, de_clean, de_ablated, d_logit, sr, sr_heads, sr_mlps, sr_ln FROM facts)
    ON de_clean, de_ablated, d_logit, sr, sr_heads, sr_mlps, sr_ln INTO NAME metric VALUE value
), ci AS (
    SELECT model, * EXCLUDE (model, g)
    FROM (PIVOT (SELECT * FROM boot_ci(long, $seed, $n_boot, $level))
          ON metric IN ('de_clean', 'de_ablated', 'd_logit', 'sr', 'sr_heads', 'sr_mlps', 'sr_ln') USING first(ci_low) AS ci_low, first(ci_high) AS ci_high
          GROUP BY model, g)
), means AS (
    SELECT s.model,
           s.unit,
           s.unit_kind,
           s.condition,
           s.layer,
           s.head,
           s.layer / m.n_layers AS rel_depth,
           count(*) AS n_tokens,
           avg(s.de_clean) AS de_clean,
           avg(s.de_ablated) AS de_ablated,
           avg(s.d_logit) AS d_logit,
           avg(s.sr) AS sr,
           avg(s.sr_heads) AS sr_heads,
           avg(s.sr_mlps) AS sr_mlps,
           avg(s.sr_ln) AS sr_ln,
           avg(s.ln_ratio) AS ln_ratio,
           avg(s.d_loss) AS d_loss,
           avg(s.kl) AS kl,
           avg(s.d_entropy) AS d_entropy,
           avg(s.top1_changed::DOUBLE) AS top1_changed
    FROM facts s
    JOIN models m USING (model)
    GROUP BY s.model, s.unit, s.unit_kind, s.condition, s.layer, s.head, m.n_layers
)
SELECT m.*, c.* EXCLUDE (model)
FROM means m
JOIN ci c USING (model)
ORDER BY model;
