-- Self-repair of each head on its top tokens
-- Per head, means over its top p% tokens (by signed clean DE) of the clean and ablated
-- DE, the logit change, self-repair and its heads/MLPs/LayerNorm split, the ln_ratio and
-- the output metrics (d_loss, kl, d_entropy, the fraction of tokens whose top-1 prediction
-- flips; NULL where the store holds none); rel_depth = layer / n_layers. The data of the paper's Figure 1.
-- param p: 0.02 — fraction of each model's tokens kept per head
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
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
FROM self_repair_top($p) s
JOIN models m USING (model)
WHERE s.ablation = $ablation AND s.sample = $sample AND s.condition = '' AND s.unit_kind = 'head'
GROUP BY s.model, s.layer, s.head, m.n_layers
ORDER BY s.model, s.layer, s.head;
