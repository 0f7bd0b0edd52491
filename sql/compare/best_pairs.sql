-- best_pairs: the best-matched one-to-one pairs with both units' statistics (SET VARIABLE layer = 'conv3'; default: all layers).
SELECT m.layer_a, m.channel_a, m.layer_b, m.channel_b, round(m.corr, 4) AS corr,
       round(ca.max, 3) AS max_a, round(cb.max, 3) AS max_b,
       round(ca.fire_rate, 3) AS fire_rate_a, round(cb.fire_rate, 3) AS fire_rate_b
FROM matches m
LEFT JOIN a.channels ca ON ca.layer = m.layer_a AND ca.channel = m.channel_a
LEFT JOIN b.channels cb ON cb.layer = m.layer_b AND cb.channel = m.channel_b
WHERE m.kind = 'one-to-one' AND m.side = 'a' AND m.corr IS NOT NULL
  AND (getvariable('layer') IS NULL OR m.layer_a = getvariable('layer'))
ORDER BY m.corr DESC, m.layer_a, m.channel_a
LIMIT 20;
