-- unmatched_units: units with no one-to-one counterpart, and why: dead over the shared images, or left over.
WITH unmatched AS (
    SELECT 'a' AS atlas, layer_a AS layer, channel_a AS channel, layer_b AS other_layer
    FROM matches WHERE kind = 'one-to-one' AND side = 'a' AND channel_b IS NULL
    UNION ALL
    SELECT 'b', layer_b, channel_b, layer_a
    FROM matches WHERE kind = 'one-to-one' AND side = 'b'
),
dead AS (  -- a unit whose best match is NULL has no variance: no correlation is defined for it
    SELECT side AS atlas, CASE side WHEN 'a' THEN layer_a ELSE layer_b END AS layer,
           CASE side WHEN 'a' THEN channel_a ELSE channel_b END AS channel
    FROM matches WHERE kind = 'best' AND corr IS NULL
)
SELECT u.atlas, u.layer, u.channel, u.other_layer,
       CASE WHEN d.channel IS NOT NULL THEN 'dead' ELSE 'left over' END AS why
FROM unmatched u LEFT JOIN dead d USING (atlas, layer, channel)
ORDER BY u.atlas, u.layer, u.channel;
