-- Self-repair of each attention layer, MLP and block against depth
-- Per model and stored layer unit (ATTN, MLP, BLOCK; ablated alone), means over the unit's top
-- p% tokens (by its signed clean DE, the sum of its components') of the clean DE, the ablated
-- DE, the logit change, self-repair and its split into heads, MLPs (outside the unit) and
-- LayerNorm (sr = sr_heads + sr_mlps + sr_ln); rel_depth = layer / n_layers. The data of the
-- Hydra effect's figure (McGrath et al. 2023), per unit kind.
-- param p: 0.02 — fraction of each model's tokens kept per unit
-- param ablation: resample — ablation kind (resample, mean, zero)
-- param sample: 0 — resample draw
SELECT s.model,
       s.unit_kind,
       s.unit,
       s.layer,
       s.layer / m.n_layers AS rel_depth,
       count(*) AS n_tokens,
       avg(s.de_clean) AS de_clean,
       avg(s.de_ablated) AS de_ablated,
       avg(s.d_logit) AS d_logit,
       avg(s.sr) AS sr,
       avg(s.sr_heads) AS sr_heads,
       avg(s.sr_mlps) AS sr_mlps,
       avg(s.sr_ln) AS sr_ln
FROM self_repair_top($p) s
JOIN models m USING (model)
WHERE s.ablation = $ablation AND s.sample = $sample AND s.condition = ''
  AND s.unit_kind IN ('attn', 'mlp', 'block')
GROUP BY s.model, s.unit_kind, s.unit, s.layer, m.n_layers
ORDER BY s.model, s.unit_kind, s.layer;
