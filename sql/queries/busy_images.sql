-- busy_images: images that excite many channels of a layer, i.e. where the
-- channel's maximum is over its dataset mean + 2 std (SET VARIABLE layer = ...; default: conv5).
SELECT a.image_id, i.path, i.label, count(*) AS strong_channels,
       (SELECT channels FROM layers WHERE layer = coalesce(getvariable('layer'), 'conv5')) AS of_channels
FROM activations a
JOIN channels c USING (layer, channel)
JOIN images i USING (image_id)
WHERE a.layer = coalesce(getvariable('layer'), 'conv5') AND a.value > c.mean + 2 * c.std
GROUP BY a.image_id, i.path, i.label
ORDER BY strong_channels DESC, a.image_id
LIMIT 20;
