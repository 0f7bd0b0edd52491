"""The layer map: names, receptive-field geometry and extraction for every model (atlas/net/layer_map.py).

`LayerMap(model, size)` reads the model as a graph; the 2012-2014 nets keep their names there (conv1..conv5,
fc6.., pool1..) so that their atlases open unchanged."""
from __future__ import annotations

from .layer_map import GraphLayerMap as LayerMap
from .layer_base import Geometry, Layer, Pool, pad_batch

__all__ = ["Geometry", "Layer", "LayerMap", "Pool", "pad_batch"]
