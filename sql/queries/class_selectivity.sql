-- class_selectivity: channels most selective for a class (SET VARIABLE label = 'circle'; default: the first class).
-- Selectivity = (mean activation on the class - mean on the rest) / channel std.
WITH target AS (
    SELECT coalesce(getvariable('label'), (SELECT min(label) FROM images WHERE label IS NOT NULL)) AS label
),
per_class AS (
    SELECT a.layer, a.channel,
           avg(a.value) FILTER (WHERE i.label = t.label) AS mean_in,
           avg(a.value) FILTER (WHERE i.label <> t.label) AS mean_out
    FROM activations a JOIN images i USING (image_id), target t
    GROUP BY a.layer, a.channel
)
SELECT p.layer, p.channel, (SELECT label FROM target) AS label,
       round(p.mean_in, 4) AS mean_in, round(p.mean_out, 4) AS mean_out,
       round((p.mean_in - p.mean_out) / nullif(c.std, 0), 3) AS selectivity
FROM per_class p JOIN channels c USING (layer, channel)
ORDER BY selectivity DESC NULLS LAST
LIMIT 20;
