-- Check: direct effects sum to the logit
-- Per token, de_other + sum of head DEs + sum of MLP DEs against logit - unembed_bias
-- (DESIGN.md, tested to 1e-4); the largest absolute error per model.
WITH heads AS (
    SELECT model, token_index, sum(de::DOUBLE) AS de FROM head_effects GROUP BY ALL
),
mlps AS (
    SELECT model, token_index, sum(de::DOUBLE) AS de FROM mlp_effects GROUP BY ALL
)
SELECT t.model,
       count(*) AS n_tokens,
       max(abs(t.de_other::DOUBLE + h.de + m.de - (t.logit::DOUBLE - t.unembed_bias::DOUBLE))) AS max_abs_error
FROM tokens t
JOIN heads h USING (model, token_index)
JOIN mlps m USING (model, token_index)
GROUP BY t.model
ORDER BY t.model;
