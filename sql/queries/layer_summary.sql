-- layer_summary: per layer, its geometry and how many of its channels are dead or rarely fire.
SELECT l.layer, l.channels, l.height, l.rf_size, l.jump,
       count(*) FILTER (WHERE c.max <= 0) AS dead,
       count(*) FILTER (WHERE c.fire_rate < 0.01) AS rarely_fire,
       round(avg(c.mean), 4) AS mean_of_means,
       round(max(c.max), 4) AS max
FROM layers l JOIN channels c USING (layer)
GROUP BY ALL
ORDER BY min(l.rf_size);
