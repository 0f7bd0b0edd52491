-- cofiring: pairs of channels of one layer that fire together across images
-- (Pearson correlation of their per-image maxima). SET VARIABLE layer = 'conv2'; default: conv1.
WITH a AS (
    SELECT image_id, channel, value FROM activations
    WHERE layer = coalesce(getvariable('layer'), 'conv1')
)
SELECT coalesce(getvariable('layer'), 'conv1') AS layer, x.channel AS channel_a, y.channel AS channel_b,
       round(corr(x.value, y.value), 4) AS correlation
FROM a x JOIN a y ON x.image_id = y.image_id AND x.channel < y.channel
GROUP BY x.channel, y.channel
HAVING correlation IS NOT NULL AND NOT isnan(correlation)
ORDER BY correlation DESC
LIMIT 20;
