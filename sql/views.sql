-- Views over an atlas folder's Parquet files.
-- Paths are relative: point DuckDB at the atlas first, e.g.
--   duckdb -cmd "SET file_search_path='my-atlas'" -c ".read sql/views.sql" -c "FROM channels LIMIT 5"
-- `atlas sql` and `atlas.open(path).sql(...)` do this for you, with each path made absolute (inside
-- the atlas folder), as `atlas sql` reads no file by a relative path.
--
-- There, two table functions more, for similarity search (atlas/similarity.py; they need the
-- atlas's indexes, which `atlas build` makes unless --no-index, and `atlas index ATLAS` makes later):
--   similar_images(image_id, k := 10, layer := NULL)  -> rank, image_id, score
--       the k images most like image_id at an indexed layer (default: the deepest indexed conv
--       layer), by cosine similarity; the image itself is rank 0 (ranks count from 0, as in top_activations).
--   similar_channels(layer, channel, k := 10, of_layer := NULL)  -> rank, layer, channel, score
--       the k channels (of every recorded layer, or of of_layer) whose responses over the dataset
--       correlate most with the channel's (the channel itself left out); rank 0 the closest.
--   SELECT * FROM similar_images(42, 10) JOIN images USING (image_id) ORDER BY rank;
--   SELECT * FROM similar_channels('conv5', 17, 10) JOIN channels USING (layer, channel) ORDER BY rank;
-- Plain DuckDB has neither: they are Python functions over the FAISS indexes in ATLAS/index/.
--
-- And one scalar function: deconv_png(layer, channel, rank [, mode [, norm [, display]]]) renders the
-- DeconvNet projection of a top-k entry on demand and returns its PNG's path (cached inside
-- the atlas; mode 'unit' (default) or 'map', norm 'identity' (default) or 'gradient', display
-- 'percentile' (default) or 'max', method 'deconvnet' (default) or 'guided' (guided backpropagation,
-- from the images), by name: deconv_png(layer, channel, rank, display := 'max')), e.g.
--   SELECT rank, deconv_png(layer, channel, rank) FROM top_activations
--   WHERE layer = 'conv5' AND channel = 17;
-- It is defined by atlas/projections.py, not here: plain DuckDB has no such function.

-- One row per image of the dataset; status is 'ok' or 'error' (with the error); content_hash, where the
-- build recorded it, is the BLAKE2b-128 of the image file's bytes.
CREATE OR REPLACE VIEW images AS
SELECT * FROM read_parquet('images.parquet');

-- One row per recorded layer, with its receptive-field geometry: unit (y, x)
-- sees input rows offset + y*jump .. offset + y*jump + rf_size - 1 (same for x).
CREATE OR REPLACE VIEW layers AS
SELECT layer, kind, channels, height, width, kernel, stride, padding, rf_size, jump, "offset"
FROM read_parquet('layers.parquet');

-- Per channel, over the per-image spatial maxima of the whole dataset.
CREATE OR REPLACE VIEW channels AS
SELECT layer, channel, mean, std, max, fire_rate
FROM read_parquet('channels.parquet');

-- The k strongest activations per channel; rank 0 is the strongest. (y, x) is
-- the position of the maximum in the layer's map, (x0, y0, x1, y1) its
-- receptive field in input pixels (clipped to the image, x1/y1 exclusive).
CREATE OR REPLACE VIEW top_activations AS
SELECT layer, channel, rank, image_id, value, y, x, x0, y0, x1, y1
FROM read_parquet('top_activations.parquet');

-- Per image, layer and channel: the spatial maximum of the channel's map.
CREATE OR REPLACE VIEW activations AS
SELECT image_id, layer, channel, value
FROM read_parquet('activations/*/*.parquet', hive_partitioning = true);
