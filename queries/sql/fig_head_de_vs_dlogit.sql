-- Per-head mean DE against mean logit change, over all tokens
-- Per model and head, over every token (not only the top p%): the mean clean DE of the
-- head and the mean change in the correct token's logit when it is ablated. On the line
-- d_logit = -de_clean the head's whole DE is lost with no self-repair; above it something
-- made up for the loss, below it the logit fell by more than the head's DE (breakage).
-- Each mean has a confidence interval (*_ci_low, *_ci_high) at the given level: a seeded
-- Poisson bootstrap over rows (tokens of one row are correlated), n_boot replicates
-- (queries/bootstrap.py).
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
-- param level: 0.95 — confidence level of the *_ci_low and *_ci_high columns
-- param seed: 0 — seed of the bootstrap over rows
-- param n_boot: 200 — bootstrap replicates
WITH facts AS (
    SELECT s.model, s.layer, s.head, t.row, s.de_clean, s.d_logit, s.d_de, s.sr
    FROM self_repair s
    JOIN tokens t USING (model, token_index)
    WHERE s.ablation = $ablation AND s.sample = $sample AND s.condition = '' AND s.unit_kind = 'head'
), long AS (
    -- one value per token and quantity, for the bootstrap (queries/bootstrap.py `boot_ci`)
    UNPIVOT (SELECT model, {'layer': layer, 'head': head} AS g, row, de_clean, d_logit, d_de, sr FROM facts)
    ON de_clean, d_logit, d_de, sr INTO NAME metric VALUE value
), ci AS (
    SELECT model, g.layer AS layer, g.head AS head, * EXCLUDE (model, g)
    FROM (PIVOT (SELECT * FROM boot_ci(long, $seed, $n_boot, $level))
          ON metric IN ('de_clean', 'd_logit', 'd_de', 'sr') USING first(ci_low) AS ci_low, first(ci_high) AS ci_high
          GROUP BY model, g)
), means AS (
    SELECT model,
           layer,
           head,
           count(*) AS n_tokens,
           avg(de_clean) AS de_clean,
           avg(d_logit) AS d_logit,
           avg(d_de) AS d_de,
           avg(sr) AS sr
    FROM facts
    GROUP BY model, layer, head
)
SELECT m.*, c.* EXCLUDE (model, layer, head)
FROM means m
JOIN ci c USING (model, layer, head)
ORDER BY model, layer, head;
