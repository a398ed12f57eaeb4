-- Distribution of ln_ratio on top tokens
-- Histogram of ln_ratio = s / s_abl (above 1: the final norm amplified what was left)
-- over the top p% tokens of one head, or of all heads when layer is -1; share_above_1 is
-- the fraction of those tokens with ln_ratio > 1.
-- param p: 0.02 — fraction of each model's tokens kept per head
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
-- param layer: -1 — layer of the head, -1 for all heads
-- param head: -1 — head index (ignored when layer is -1)
-- param bin_width: 0.01 — histogram bin width
WITH r AS (
    SELECT model, ln_ratio
    FROM self_repair_top($p)
    WHERE ablation = $ablation AND sample = $sample AND condition = '' AND unit_kind = 'head'
      AND ($layer < 0 OR (layer = $layer AND head = $head))
),
bins AS (
    SELECT model,
           floor(ln_ratio / $bin_width) AS bin,
           count(*) AS n_tokens
    FROM r
    GROUP BY model, bin
),
above AS (
    SELECT model, avg(CASE WHEN ln_ratio > 1 THEN 1.0 ELSE 0.0 END) AS share_above_1
    FROM r
    GROUP BY model
)
SELECT b.model,
       b.bin * $bin_width AS bin_lo,
       (b.bin + 1) * $bin_width AS bin_hi,
       b.n_tokens,
       b.n_tokens / sum(b.n_tokens) OVER (PARTITION BY b.model) AS fraction,
       a.share_above_1
FROM bins b
JOIN above a USING (model)
ORDER BY b.model, bin_lo;
