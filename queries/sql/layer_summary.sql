-- Self-repair per layer
-- Per model and layer, means over each head's top p% tokens of the clean DE, the logit
-- change, self-repair and its LayerNorm part. Printed by ingest after a run.
-- Each mean has a confidence interval (*_ci_low, *_ci_high) at the given level: a seeded
-- Poisson bootstrap over rows (tokens of one row are correlated), n_boot replicates
-- (queries/bootstrap.py).
-- param p: 0.02 — fraction of each model's tokens kept per head
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
-- param level: 0.95 — confidence level of the *_ci_low and *_ci_high columns
-- param seed: 0 — seed of the bootstrap over rows
-- param n_boot: 200 — bootstrap replicates
WITH facts AS (
    SELECT s.model, s.layer, s.head, t.row, s.de_clean AS de, s.d_logit, s.sr, s.sr_ln
    FROM self_repair_top($p) s
    JOIN tokens t USING (model, token_index)
    WHERE s.ablation = $ablation AND s.sample = $sample AND s.condition = '' AND s.unit_kind = 'head'
), long AS (
    UNPIVOT (SELECT model, layer AS g, row, de, d_logit, sr, sr_ln FROM facts)
    ON de, d_logit, sr, sr_ln INTO NAME metric VALUE value
), ci AS (
    PIVOT (SELECT * FROM boot_ci(long, $seed, $n_boot, $level))
    ON metric IN ('de', 'd_logit', 'sr', 'sr_ln') USING first(ci_low) AS ci_low, first(ci_high) AS ci_high
    GROUP BY model, g
), means AS (
    SELECT model,
           layer,
           count(DISTINCT head) AS n_heads,
           count(*) AS n_tokens,
           avg(de) AS de,
           avg(d_logit) AS d_logit,
           avg(sr) AS sr,
           avg(sr_ln) AS sr_ln
    FROM facts
    GROUP BY model, layer
)
SELECT m.*, c.* EXCLUDE (model, g)
FROM means m
JOIN ci c ON c.model = m.model AND c.g = m.layer
ORDER BY model, layer;
