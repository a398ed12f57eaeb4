-- Spread of each head's self-repair across resample draws
-- Per model, head and resample draw: the mean self-repair and clean DE over the head's
-- top p% tokens under resample ablation, one row per draw, over the tokens every stored
-- draw of the head covers (a partial store's draws may cover different tokens; n_dropped
-- counts this draw's tokens left out for that). sr_draws is the mean over the draws, with a
-- confidence interval (sr_ci_low, sr_ci_high) at the given level from a seeded Poisson
-- bootstrap over rows and draws together, n_boot replicates (queries/bootstrap.py).
-- param p: 0.02 — fraction of each model's tokens kept per head
-- param level: 0.95 — confidence level of the sr_ci_low and sr_ci_high columns
-- param seed: 0 — seed of the bootstrap over rows and draws
-- param n_boot: 200 — bootstrap replicates
WITH facts AS (
    SELECT s.model, s.layer, s.head, s.sample, s.token_index, t.row, s.de_clean, s.sr
    FROM self_repair_top($p) s
    JOIN tokens t USING (model, token_index)
    WHERE s.ablation = 'resample' AND s.condition = '' AND s.unit_kind = 'head'
), draws AS (
    SELECT model, layer, head, count(DISTINCT sample) AS n_draws
    FROM facts
    GROUP BY model, layer, head
), common AS (
    -- the tokens every draw of the head covers
    SELECT f.model, f.layer, f.head, f.token_index
    FROM facts f
    JOIN draws d USING (model, layer, head)
    GROUP BY f.model, f.layer, f.head, f.token_index, d.n_draws
    HAVING count(DISTINCT f.sample) = d.n_draws
), kept AS (
    SELECT f.*
    FROM facts f
    SEMI JOIN common c USING (model, layer, head, token_index)
), per_row AS (
    SELECT model, layer, head, sample, row, count(*) AS n, sum(sr) AS sr
    FROM kept
    GROUP BY model, layer, head, sample, row
), dense AS (
    -- each (head, draw)'s per-row sums over every row of its model, in row order (0 where it has no token)
    SELECT g.model, g.layer, g.head, g.sample,
           list(coalesce(r.n, 0)::DOUBLE ORDER BY k.row) AS n,
           list(coalesce(r.sr, 0)::DOUBLE ORDER BY k.row) AS sr
    FROM (SELECT DISTINCT model, layer, head, sample FROM per_row) g
    JOIN boot_rows() k USING (model)
    LEFT JOIN per_row r ON r.model = g.model AND r.layer = g.layer AND r.head = g.head AND r.sample = g.sample
                       AND r.row = k.row
    GROUP BY g.model, g.layer, g.head, g.sample
), by_draw AS (
    -- each replicate's row-weighted sums and counts per draw
    SELECT d.model, d.layer, d.head, d.sample, w.b,
           list_dot_product(w.w, d.sr) AS sr, list_dot_product(w.w, d.n) AS n
    FROM dense d
    JOIN boot_row_weights($seed, $n_boot) w USING (model)
), boot AS (
    -- and the draws weighted too: Σ draw weight · row-weighted sum / Σ draw weight · row-weighted count
    SELECT r.model, r.layer, r.head, r.b,
           sum(wd.w * r.sr) / nullif(sum(wd.w * r.n), 0) AS sr
    FROM by_draw r
    JOIN boot_weights($seed, $n_boot) wd ON wd.model = r.model AND wd.kind = 'draw' AND wd.key = r.sample
                                         AND wd.b = r.b
    GROUP BY r.model, r.layer, r.head, r.b
), ci AS (
    SELECT model, layer, head,
           quantile_cont(sr, (1 - $level) / 2) AS sr_ci_low,
           quantile_cont(sr, (1 + $level) / 2) AS sr_ci_high
    FROM boot
    GROUP BY model, layer, head
), per_draw AS (
    SELECT model, layer, head, sample, count(*) AS n_tokens, avg(de_clean) AS de_clean, avg(sr) AS sr
    FROM kept
    GROUP BY model, layer, head, sample
), stored AS (
    SELECT model, layer, head, sample, count(*) AS n_stored
    FROM facts
    GROUP BY model, layer, head, sample
), pooled AS (
    SELECT model, layer, head, avg(sr) AS sr_draws
    FROM kept
    GROUP BY model, layer, head
)
SELECT d.model, d.layer, d.head, d.sample, d.n_tokens, d.de_clean, d.sr,
       s.n_stored - d.n_tokens AS n_dropped, p.sr_draws, c.sr_ci_low, c.sr_ci_high
FROM per_draw d
JOIN stored s USING (model, layer, head, sample)
JOIN pooled p USING (model, layer, head)
JOIN ci c USING (model, layer, head)
ORDER BY model, layer, head, sample;
