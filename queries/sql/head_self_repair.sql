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
), per_row AS (
    SELECT model, layer, head, row, count(*) AS n, sum(de_clean) AS de_clean, sum(de_ablated) AS de_ablated, sum(d_logit) AS d_logit, sum(sr) AS sr, sum(sr_heads) AS sr_heads, sum(sr_mlps) AS sr_mlps, sum(sr_ln) AS sr_ln
    FROM facts
    GROUP BY model, layer, head, row
), boot AS (
    SELECT r.model, r.layer, r.head, w.b,
           sum(w.w * r.de_clean) / nullif(sum(w.w * r.n), 0) AS de_clean,
           sum(w.w * r.de_ablated) / nullif(sum(w.w * r.n), 0) AS de_ablated,
           sum(w.w * r.d_logit) / nullif(sum(w.w * r.n), 0) AS d_logit,
           sum(w.w * r.sr) / nullif(sum(w.w * r.n), 0) AS sr,
           sum(w.w * r.sr_heads) / nullif(sum(w.w * r.n), 0) AS sr_heads,
           sum(w.w * r.sr_mlps) / nullif(sum(w.w * r.n), 0) AS sr_mlps,
           sum(w.w * r.sr_ln) / nullif(sum(w.w * r.n), 0) AS sr_ln
    FROM per_row r
    JOIN boot_weights($seed, $n_boot) w ON w.model = r.model AND w.kind = 'row' AND w.key = r.row
    GROUP BY r.model, r.layer, r.head, w.b
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
