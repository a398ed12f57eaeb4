-- Stored units and conditions with their members
-- One row per model, ablation, draw, condition and unit with a stored ablation shard
-- (stored_units), with the unit's members joined by '+' in (component, layer, head) order
-- (a group's heads, `L1H0+L2H1`; an MLP as `MLP1`) and, for a conditioned row, the
-- condition's kind and members (unit_members lists conditions too). What `selfrepair head`
-- and `info` resolve a label or a group's name against, and what a refusal lists.
WITH members AS (
    SELECT model, unit, any_value(unit_kind) AS unit_kind,
           string_agg(CASE WHEN component = 'mlp' THEN 'MLP' || layer ELSE 'L' || layer || 'H' || head END, '+'
                      ORDER BY component, layer, head) AS members
    FROM unit_members
    GROUP BY model, unit
)
SELECT s.model, s.ablation, s.sample, s.condition, s.unit, s.unit_kind, s.layer, s.head, s.batches,
       u.members, c.unit_kind AS condition_kind, c.members AS condition_members
FROM stored_units s
LEFT JOIN members u ON u.model = s.model AND u.unit = s.unit
LEFT JOIN members c ON c.model = s.model AND c.unit = s.condition
ORDER BY s.model, s.ablation, s.sample, s.condition, s.layer, s.head, s.unit_kind, s.unit;
