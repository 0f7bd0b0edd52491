-- match_quality: per layer pair, live units, matches, mean and median correlation, pairs over 0.9, 0.7, 0.5 (SET VARIABLE layer = 'conv3'; default: all).
SELECT p.layer_a, p.layer_b, p.images, p.live_a, p.live_b, p.matched,
       round(p.mean_one_to_one, 4) AS mean_corr, round(p.median_one_to_one, 4) AS median_corr,
       count(*) FILTER (WHERE m.corr >= 0.9) AS over_0_9,
       count(*) FILTER (WHERE m.corr >= 0.7) AS over_0_7,
       count(*) FILTER (WHERE m.corr >= 0.5) AS over_0_5,
       p.mutual_best
FROM layer_pairs p
LEFT JOIN matches m ON m.layer_a = p.layer_a AND m.layer_b = p.layer_b
     AND m.kind = 'one-to-one' AND m.side = 'a' AND m.corr IS NOT NULL
WHERE getvariable('layer') IS NULL OR p.layer_a = getvariable('layer')
GROUP BY ALL
ORDER BY p.layer_a;
