-- Self-repair of each head over all tokens
-- Per head, means over every token (not only the top p%) of the clean and ablated DE,
-- the logit change, self-repair and its heads/MLPs/LayerNorm split, and the ln_ratio;
-- the all-token counterpart of head_top_self_repair (the paper's all_tokens rows).
-- Each mean has a confidence interval (*_ci_low, *_ci_high) at the given level: a seeded
-- Poisson bootstrap over rows (tokens of one row are correlated), n_boot replicates
-- (queries/bootstrap.py).
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
-- param level: 0.95 — confidence level of the *_ci_low and *_ci_high columns
-- param seed: 0 — seed of the bootstrap over rows
-- param n_boot: 200 — bootstrap replicates
WITH facts AS (
    SELECT s.model, s.layer, s.head, t.row, s.de_clean, s.de_ablated, s.d_logit, s.sr, s.sr_heads, s.sr_mlps, s.sr_ln, s.ln_ratio
    FROM self_repair s
    JOIN tokens t USING (model, token_index)
    WHERE s.ablation = $ablation AND s.sample = $sample AND s.condition = '' AND s.unit_kind = 'head'
), long AS (
    -- one value per token and quantity, for the bootstrap (queries/bootstrap.py `boot_ci`)
    UNPIVOT (SELECT model, {'layer': layer, 'head': head} AS g, row, de_clean, de_ablated, d_logit, sr, sr_heads, sr_mlps, sr_ln FROM facts)
    ON de_clean, de_ablated, d_logit, sr, sr_heads, sr_mlps, sr_ln INTO NAME metric VALUE value
), ci AS (
    SELECT model, g.layer AS layer, g.head AS head, * EXCLUDE (model, g)
    FROM (PIVOT (SELECT * FROM boot_ci(long, $seed, $n_boot, $level))
          ON metric IN ('de_clean', 'de_ablated', 'd_logit', 'sr', 'sr_heads', 'sr_mlps', 'sr_ln') USING first(ci_low) AS ci_low, first(ci_high) AS ci_high
          GROUP BY model, g)
), means AS (
    SELECT model,
           layer,
           head,
           count(*) AS n_tokens,
           avg(de_clean) AS de_clean,
           avg(de_ablated) AS de_ablated,
           avg(d_logit) AS d_logit,
           avg(sr) AS sr,
           avg(sr_heads) AS sr_heads,
           avg(sr_mlps) AS sr_mlps,
           avg(sr_ln) AS sr_ln,
           avg(ln_ratio) AS ln_ratio
    FROM facts
    GROUP BY model, layer, head
)
SELECT m.*, c.* EXCLUDE (model, layer, head)
FROM means m
JOIN ci c USING (model, layer, head)
ORDER BY model, layer, head;
