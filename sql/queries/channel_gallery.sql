-- channel_gallery: a channel's top-k with each projection rendered on demand (deconv_png; SET VARIABLE
-- layer = ..., channel = ...; default: conv5 channel 0). The first run renders, later runs read the cache.
SELECT t.rank, t.value, i.label, i.path AS image,
       deconv_png(t.layer, t.channel, t.rank) AS projection
FROM top_activations t
JOIN images i USING (image_id)
WHERE t.layer = coalesce(getvariable('layer'), 'conv5')
  AND t.channel = coalesce(getvariable('channel')::INTEGER, 0)
ORDER BY t.rank;
