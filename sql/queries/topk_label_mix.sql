-- topk_label_mix: the labels among each channel's top-k images, most frequent first
-- (SET VARIABLE layer = 'conv5'; default: every layer).
SELECT t.layer, t.channel, i.label, count(*) AS n,
       round(count(*) / sum(count(*)) OVER (PARTITION BY t.layer, t.channel), 3) AS share
FROM top_activations t JOIN images i USING (image_id)
WHERE getvariable('layer') IS NULL OR t.layer = getvariable('layer')
GROUP BY t.layer, t.channel, i.label
ORDER BY t.layer, t.channel, n DESC, i.label;
