-- Self-repair against relative depth
-- Per model and layer at relative depth layer / n_layers: the mean lost DE (-d_de), the
-- mean self-repair, and repair_fraction = mean(sr) / mean(-d_de), the ratio of means of
-- how much of the lost direct effect came back, over each head's top p% tokens.
-- param p: 0.02 — fraction of each model's tokens kept per head
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
SELECT s.model,
       s.layer,
       s.layer / m.n_layers AS rel_depth,
       count(*) AS n_tokens,
       avg(s.de_clean) AS de_clean,
       -avg(s.d_de) AS lost_de,
       avg(s.sr) AS sr,
       avg(s.sr) / nullif(-avg(s.d_de), 0) AS repair_fraction
FROM self_repair_top($p) s
JOIN models m USING (model)
WHERE s.ablation = $ablation AND s.sample = $sample AND s.condition = '' AND s.unit_kind = 'head'
GROUP BY s.model, s.layer, m.n_layers
ORDER BY s.model, s.layer;
