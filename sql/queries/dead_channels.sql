-- dead_channels: channels that never fire (their maximum over the dataset is <= 0).
SELECT layer, channel, max, fire_rate
FROM channels
WHERE max <= 0
ORDER BY layer, channel;
