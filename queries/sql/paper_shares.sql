-- Shares of DE per head and per layer (authors' statistic)
-- Rushing & Nanda's per-token clipped shares: for each of a head's top p% tokens (by signed
-- clean DE), clip(x / de_clean, 0, 1) for x = sr_heads, sr_mlps (every MLP layer), sr_ln and
-- sr, averaged over the tokens where it is a number. As in their code, a token with de_clean = 0
-- counts as 1 (x > 0) or 0 (x < 0), and one with x = 0 as well is left out (0/0 is NaN, and they
-- took a nanmean). Rows with head NULL: the layer's mean over its heads (a NULL head share
-- leaves the layer's share NULL, as their mean did). DESIGN.md's headline is the ratio of means
-- (queries `breakdown`, `ln_share`).
-- param p: 0.02 — fraction of each model's tokens kept per head
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
WITH ratios AS (
    -- IEEE division: x / 0 is ±inf (clipped to 1 or 0); 0 / 0 is NaN, left out of the mean
    SELECT model, layer, head, de_clean,
           sr_heads / de_clean AS heads, sr_mlps / de_clean AS mlps, sr_ln / de_clean AS ln, sr / de_clean AS total
    FROM self_repair_top($p)
    WHERE ablation = $ablation AND sample = $sample AND condition = '' AND unit_kind = 'head'
),
per_head AS (
    SELECT model, layer, head,
           count(*) AS n_tokens,
           avg(de_clean) AS de_clean,
           avg(least(greatest(heads, 0), 1)) FILTER (WHERE NOT isnan(heads)) AS heads_share,
           avg(least(greatest(mlps, 0), 1)) FILTER (WHERE NOT isnan(mlps)) AS mlps_share,
           avg(least(greatest(ln, 0), 1)) FILTER (WHERE NOT isnan(ln)) AS ln_share,
           avg(least(greatest(total, 0), 1)) FILTER (WHERE NOT isnan(total)) AS sr_share
    FROM ratios
    GROUP BY model, layer, head
)
SELECT model, layer, head, n_tokens, de_clean, heads_share, mlps_share, ln_share, sr_share
FROM per_head
UNION ALL
SELECT model, layer, NULL, sum(n_tokens), avg(de_clean),
       CASE WHEN count(heads_share) = count(*) THEN avg(heads_share) END,
       CASE WHEN count(mlps_share) = count(*) THEN avg(mlps_share) END,
       CASE WHEN count(ln_share) = count(*) THEN avg(ln_share) END,
       CASE WHEN count(sr_share) = count(*) THEN avg(sr_share) END
FROM per_head
GROUP BY model, layer
ORDER BY model, layer, head NULLS LAST;
