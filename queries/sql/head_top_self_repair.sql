-- Self-repair of each head on its top tokens
-- Per head, means over its top p% tokens (by signed clean DE) of the clean and ablated
-- DE, the logit change, self-repair and its heads/MLPs/LayerNorm split, the ln_ratio and
-- the output metrics (d_loss, kl, d_entropy, the fraction of tokens whose top-1 prediction
-- flips; NULL where the store holds none); rel_depth = layer / n_layers. The data of the paper's Figure 1.
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
    SELECT s.model, s.layer, s.head, t.row, s.de_clean, s.de_ablated, s.d_logit, s.sr, s.sr_heads, s.sr_mlps, s.sr_ln, s.ln_ratio,
           s.d_loss, s.kl, s.d_entropy, s.top1_changed
    FROM self_repair_top($p) s
    JOIN tokens t USING (model, token_index)
    WHERE s.ablation = $ablation AND s.sample = $sample AND s.condition = '' AND s.unit_kind = 'head'
), per_row AS (
    SELECT model, layer, head, row, count(*) AS n, sum(de_clean) AS de_clean, sum(de_ablated) AS de_ablated, sum(d_logit) AS d_logit, sum(sr) AS sr, sum(sr_heads) AS sr_heads, sum(sr_mlps) AS sr_mlps, sum(sr_ln) AS sr_ln
    FROM facts
    GROUP BY model, layer, head, row
), dense AS (
    -- each group's per-row sums over every row of its model, in row order (0 where it has no token)
    SELECT g.model, g.layer, g.head,
           list(coalesce(r.n, 0)::DOUBLE ORDER BY k.row) AS n,
           list(coalesce(r.de_clean, 0)::DOUBLE ORDER BY k.row) AS de_clean,
           list(coalesce(r.de_ablated, 0)::DOUBLE ORDER BY k.row) AS de_ablated,
           list(coalesce(r.d_logit, 0)::DOUBLE ORDER BY k.row) AS d_logit,
           list(coalesce(r.sr, 0)::DOUBLE ORDER BY k.row) AS sr,
           list(coalesce(r.sr_heads, 0)::DOUBLE ORDER BY k.row) AS sr_heads,
           list(coalesce(r.sr_mlps, 0)::DOUBLE ORDER BY k.row) AS sr_mlps,
           list(coalesce(r.sr_ln, 0)::DOUBLE ORDER BY k.row) AS sr_ln
    FROM (SELECT DISTINCT model, layer, head FROM per_row) g
    JOIN boot_rows() k USING (model)
    LEFT JOIN per_row r ON r.model = g.model AND r.layer = g.layer AND r.head = g.head AND r.row = k.row
    GROUP BY g.model, g.layer, g.head
), boot AS (
    -- each replicate's means: row weights · per-row sums / row weights · per-row counts
    SELECT d.model, d.layer, d.head, w.b,
           list_dot_product(w.w, d.de_clean) / nullif(list_dot_product(w.w, d.n), 0) AS de_clean,
           list_dot_product(w.w, d.de_ablated) / nullif(list_dot_product(w.w, d.n), 0) AS de_ablated,
           list_dot_product(w.w, d.d_logit) / nullif(list_dot_product(w.w, d.n), 0) AS d_logit,
           list_dot_product(w.w, d.sr) / nullif(list_dot_product(w.w, d.n), 0) AS sr,
           list_dot_product(w.w, d.sr_heads) / nullif(list_dot_product(w.w, d.n), 0) AS sr_heads,
           list_dot_product(w.w, d.sr_mlps) / nullif(list_dot_product(w.w, d.n), 0) AS sr_mlps,
           list_dot_product(w.w, d.sr_ln) / nullif(list_dot_product(w.w, d.n), 0) AS sr_ln
    FROM dense d
    JOIN boot_row_weights($seed, $n_boot) w USING (model)
), ci AS (
    SELECT model, layer, head,
           quantile_cont(de_clean, (1 - $level) / 2) AS de_clean_ci_low,
           quantile_cont(de_clean, (1 + $level) / 2) AS de_clean_ci_high,
           quantile_cont(de_ablated, (1 - $level) / 2) AS de_ablated_ci_low,
           quantile_cont(de_ablated, (1 + $level) / 2) AS de_ablated_ci_high,
           quantile_cont(d_logit, (1 - $level) / 2) AS d_logit_ci_low,
           quantile_cont(d_logit, (1 + $level) / 2) AS d_logit_ci_high,
           quantile_cont(sr, (1 - $level) / 2) AS sr_ci_low,
           quantile_cont(sr, (1 + $level) / 2) AS sr_ci_high,
           quantile_cont(sr_heads, (1 - $level) / 2) AS sr_heads_ci_low,
           quantile_cont(sr_heads, (1 + $level) / 2) AS sr_heads_ci_high,
           quantile_cont(sr_mlps, (1 - $level) / 2) AS sr_mlps_ci_low,
           quantile_cont(sr_mlps, (1 + $level) / 2) AS sr_mlps_ci_high,
           quantile_cont(sr_ln, (1 - $level) / 2) AS sr_ln_ci_low,
           quantile_cont(sr_ln, (1 + $level) / 2) AS sr_ln_ci_high
    FROM boot
    GROUP BY model, layer, head
), means AS (
    SELECT s.model,
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
    GROUP BY s.model, s.layer, s.head, m.n_layers
)
SELECT m.*, c.* EXCLUDE (model, layer, head)
FROM means m
JOIN ci c USING (model, layer, head)
ORDER BY model, layer, head;
