-- Self-repair split into heads, MLPs and LayerNorm
-- Per model and layer, over each head's top p% tokens: mean self-repair and its three
-- parts (sr = sr_heads + sr_mlps + sr_ln), and each as a share of DE, the ratio of means
-- mean(x) / mean(de_clean).
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
    SELECT s.model, s.layer, s.head, t.row, s.de_clean, s.sr, s.sr_heads, s.sr_mlps, s.sr_ln
    FROM self_repair_top($p) s
    JOIN tokens t USING (model, token_index)
    WHERE s.ablation = $ablation AND s.sample = $sample AND s.condition = '' AND s.unit_kind = 'head'
), long AS (
    -- one value per token and quantity, for the bootstrap (queries/bootstrap.py `boot_ci`)
    UNPIVOT (SELECT model, layer AS g, row, de_clean, sr, sr_heads, sr_mlps, sr_ln FROM facts)
    ON de_clean, sr, sr_heads, sr_mlps, sr_ln INTO NAME metric VALUE value
), ci AS (
    SELECT model, g AS layer, * EXCLUDE (model, g)
    FROM (PIVOT (SELECT * FROM boot_ci(long, $seed, $n_boot, $level))
          ON metric IN ('de_clean', 'sr', 'sr_heads', 'sr_mlps', 'sr_ln') USING first(ci_low) AS ci_low, first(ci_high) AS ci_high
          GROUP BY model, g)
), means AS (
    SELECT model,
           layer,
           count(*) AS n_tokens,
           avg(de_clean) AS de_clean,
           avg(sr) AS sr,
           avg(sr_heads) AS sr_heads,
           avg(sr_mlps) AS sr_mlps,
           avg(sr_ln) AS sr_ln,
           avg(sr) / nullif(avg(de_clean), 0) AS sr_share,
           avg(sr_heads) / nullif(avg(de_clean), 0) AS heads_share,
           avg(sr_mlps) / nullif(avg(de_clean), 0) AS mlps_share,
           avg(sr_ln) / nullif(avg(de_clean), 0) AS ln_share
    FROM facts
    GROUP BY model, layer
)
SELECT m.*, c.* EXCLUDE (model, layer)
FROM means m
JOIN ci c USING (model, layer)
ORDER BY model, layer;
