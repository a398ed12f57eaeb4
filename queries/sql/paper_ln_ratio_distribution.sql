-- Distribution of ln_ratio above the 98th percentile of DE (authors' statistic)
-- Histogram of ln_ratio = s / s_abl over one head's tokens whose clean DE is strictly above
-- the head's 98th percentile of clean DE (linear interpolation, as numpy's percentile), the
-- token set of Rushing & Nanda's LN figure; share_above_1 is the fraction with ln_ratio > 1.
-- The query `ln_ratio_distribution` uses the top p% tokens instead.
-- param layer — layer of the head
-- param head — head index
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
-- param bin_width: 0.01 — histogram bin width
WITH head AS (
    SELECT model, de_clean, ln_ratio
    FROM self_repair
    WHERE layer = $layer AND head = $head AND ablation = $ablation AND sample = $sample
      AND condition = '' AND unit_kind = 'head'
),
r AS (
    SELECT h.model, h.ln_ratio
    FROM head h
    JOIN (SELECT model, quantile_cont(de_clean, 0.98) AS cut FROM head GROUP BY model) q USING (model)
    WHERE h.de_clean > q.cut
)
SELECT model,
       floor(ln_ratio / $bin_width) * $bin_width AS bin_lo,
       (floor(ln_ratio / $bin_width) + 1) * $bin_width AS bin_hi,
       count(*) AS n_tokens,
       count(*) / sum(count(*)) OVER (PARTITION BY model) AS fraction,
       sum(count(*) FILTER (WHERE ln_ratio > 1)) OVER (PARTITION BY model)
           / sum(count(*)) OVER (PARTITION BY model) AS share_above_1
FROM r
GROUP BY model, floor(ln_ratio / $bin_width)
ORDER BY model, bin_lo;
