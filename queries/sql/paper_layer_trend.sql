-- Self-repair as a fraction of DE per layer (authors' statistic)
-- Rushing & Nanda's layer trend: per head, clip((d_logit + de_clean) / de_clean, 0, 1) of the
-- head's all-token means of query `paper_head_de_vs_dlogit` (batch means over tokens with
-- |DE| > 0), then the mean over the layer's heads. The ratio of means over top tokens is the
-- query `layer_trend`.
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
SELECT h.model,
       h.layer,
       h.layer / m.n_layers AS rel_depth,
       count(*) AS n_heads,
       avg(h.de_clean) AS de_clean,
       avg(h.d_logit) AS d_logit,
       avg(least(greatest((h.d_logit + h.de_clean) / h.de_clean, 0), 1)) AS repair_fraction
FROM paper_head_means($ablation, $sample) h
JOIN models m USING (model)
GROUP BY h.model, h.layer, m.n_layers
ORDER BY h.model, h.layer;
