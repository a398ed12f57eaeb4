-- Self-repair against relative depth
-- Per model and layer at relative depth layer / n_layers: the mean lost DE (-d_de), the
-- mean self-repair, and repair_fraction = mean(sr) / mean(-d_de), the ratio of means of
-- how much of the lost direct effect came back, over each head's top p% tokens.
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
    SELECT s.model, s.layer, s.head, t.row, s.de_clean, -s.d_de AS lost_de, s.sr
    FROM self_repair_top($p) s
    JOIN tokens t USING (model, token_index)
    WHERE s.ablation = $ablation AND s.sample = $sample AND s.condition = '' AND s.unit_kind = 'head'
), long AS (
    -- one value per token and quantity, for the bootstrap (queries/bootstrap.py `boot_ci`)
    UNPIVOT (SELECT model, layer AS g, row, de_clean, lost_de, sr FROM facts)
    ON de_clean, lost_de, sr INTO NAME metric VALUE value
), ci AS (
    SELECT model, g AS layer, * EXCLUDE (model, g)
    FROM (PIVOT (SELECT * FROM boot_ci(long, $seed, $n_boot, $level))
          ON metric IN ('de_clean', 'lost_de', 'sr') USING first(ci_low) AS ci_low, first(ci_high) AS ci_high
          GROUP BY model, g)
), means AS (
    SELECT s.model,
           s.layer,
           s.layer / m.n_layers AS rel_depth,
           count(*) AS n_tokens,
           avg(s.de_clean) AS de_clean,
           avg(s.lost_de) AS lost_de,
           avg(s.sr) AS sr,
           avg(s.sr) / nullif(avg(s.lost_de), 0) AS repair_fraction
    FROM facts s
    JOIN models m USING (model)
    GROUP BY s.model, s.layer, m.n_layers
)
SELECT m.*, c.* EXCLUDE (model, layer)
FROM means m
JOIN ci c USING (model, layer)
ORDER BY model, layer;
