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
), per_row AS (
    SELECT model, layer, head, row, count(*) AS n, sum(de_clean) AS de_clean, sum(d_logit) AS d_logit, sum(d_de) AS d_de, sum(sr) AS sr
    FROM facts
    GROUP BY model, layer, head, row
), dense AS (
    -- each group's per-row sums over every row of its model, in row order (0 where it has no token)
    SELECT g.model, g.layer, g.head,
           list(coalesce(r.n, 0)::DOUBLE ORDER BY k.row) AS n,
           list(coalesce(r.de_clean, 0)::DOUBLE ORDER BY k.row) AS de_clean,
           list(coalesce(r.d_logit, 0)::DOUBLE ORDER BY k.row) AS d_logit,
           list(coalesce(r.d_de, 0)::DOUBLE ORDER BY k.row) AS d_de,
           list(coalesce(r.sr, 0)::DOUBLE ORDER BY k.row) AS sr
    FROM (SELECT DISTINCT model, layer, head FROM per_row) g
    JOIN boot_rows() k USING (model)
    LEFT JOIN per_row r ON r.model = g.model AND r.layer = g.layer AND r.head = g.head AND r.row = k.row
    GROUP BY g.model, g.layer, g.head
), boot AS (
    -- each replicate's means: row weights · per-row sums / row weights · per-row counts
    SELECT d.model, d.layer, d.head, w.b,
           list_dot_product(w.w, d.de_clean) / nullif(list_dot_product(w.w, d.n), 0) AS de_clean,
           list_dot_product(w.w, d.d_logit) / nullif(list_dot_product(w.w, d.n), 0) AS d_logit,
           list_dot_product(w.w, d.d_de) / nullif(list_dot_product(w.w, d.n), 0) AS d_de,
           list_dot_product(w.w, d.sr) / nullif(list_dot_product(w.w, d.n), 0) AS sr
    FROM dense d
    JOIN boot_row_weights($seed, $n_boot) w USING (model)
), ci AS (
    SELECT model, layer, head,
           quantile_cont(de_clean, (1 - $level) / 2) AS de_clean_ci_low,
           quantile_cont(de_clean, (1 + $level) / 2) AS de_clean_ci_high,
           quantile_cont(d_logit, (1 - $level) / 2) AS d_logit_ci_low,
           quantile_cont(d_logit, (1 + $level) / 2) AS d_logit_ci_high,
           quantile_cont(d_de, (1 - $level) / 2) AS d_de_ci_low,
           quantile_cont(d_de, (1 + $level) / 2) AS d_de_ci_high,
           quantile_cont(sr, (1 - $level) / 2) AS sr_ci_low,
           quantile_cont(sr, (1 + $level) / 2) AS sr_ci_high
    FROM boot
    GROUP BY model, layer, head
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
