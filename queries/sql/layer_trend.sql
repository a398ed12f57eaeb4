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
), per_row AS (
    SELECT model, layer, row, count(*) AS n, sum(de_clean) AS de_clean, sum(lost_de) AS lost_de, sum(sr) AS sr
    FROM facts
    GROUP BY model, layer, row
), dense AS (
    -- each group's per-row sums over every row of its model, in row order (0 where it has no token)
    SELECT g.model, g.layer,
           list(coalesce(r.n, 0)::DOUBLE ORDER BY k.row) AS n,
           list(coalesce(r.de_clean, 0)::DOUBLE ORDER BY k.row) AS de_clean,
           list(coalesce(r.lost_de, 0)::DOUBLE ORDER BY k.row) AS lost_de,
           list(coalesce(r.sr, 0)::DOUBLE ORDER BY k.row) AS sr
    FROM (SELECT DISTINCT model, layer FROM per_row) g
    JOIN boot_rows() k USING (model)
    LEFT JOIN per_row r ON r.model = g.model AND r.layer = g.layer AND r.row = k.row
    GROUP BY g.model, g.layer
), boot AS (
    -- each replicate's means: row weights · per-row sums / row weights · per-row counts
    SELECT d.model, d.layer, w.b,
           list_dot_product(w.w, d.de_clean) / nullif(list_dot_product(w.w, d.n), 0) AS de_clean,
           list_dot_product(w.w, d.lost_de) / nullif(list_dot_product(w.w, d.n), 0) AS lost_de,
           list_dot_product(w.w, d.sr) / nullif(list_dot_product(w.w, d.n), 0) AS sr
    FROM dense d
    JOIN boot_row_weights($seed, $n_boot) w USING (model)
), ci AS (
    SELECT model, layer,
           quantile_cont(de_clean, (1 - $level) / 2) AS de_clean_ci_low,
           quantile_cont(de_clean, (1 + $level) / 2) AS de_clean_ci_high,
           quantile_cont(lost_de, (1 - $level) / 2) AS lost_de_ci_low,
           quantile_cont(lost_de, (1 + $level) / 2) AS lost_de_ci_high,
           quantile_cont(sr, (1 - $level) / 2) AS sr_ci_low,
           quantile_cont(sr, (1 + $level) / 2) AS sr_ci_high
    FROM boot
    GROUP BY model, layer
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
