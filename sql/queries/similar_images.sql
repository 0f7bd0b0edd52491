-- similar_images: the images the network sees as most like one image, with paths and labels
-- (SET VARIABLE image_id = 42, k = 10, layer = 'fc7'; defaults: image 0, 10, the deepest indexed conv layer).
-- Needs the atlas's similarity indexes (`atlas index ATLAS`); the image itself comes first (rank 0, score 1).
SELECT s.rank, s.image_id, i.path, i.label, round(s.score, 4) AS score,
       i.label IS NOT DISTINCT FROM q.label AS same_label
FROM similar_images(coalesce(getvariable('image_id'), 0)::BIGINT, coalesce(getvariable('k'), 10)::BIGINT,
                    layer := getvariable('layer')::VARCHAR) s
JOIN images i USING (image_id)
CROSS JOIN (SELECT label FROM images WHERE image_id = coalesce(getvariable('image_id'), 0)::BIGINT) q
ORDER BY s.rank;
