"""The DeconvNet projection engine (Zeiler & Fergus 2014, section 2.1): algorithm only, no I/O.

A projection takes one chosen activation -- image n, layer L, channel c,
position (y, x) -- keeps it, zeroes every other activation of the layer, and
runs the model's graph backwards down to pixels, every op undone by its rule
(atlas/deconv/graph_engine.py lists them): a ReLU rectifies the signal, a convolution
filters with its transposed weights (no bias), a max-pool unpools by its switches
(overlapping windows ADD), a LocalResponseNorm is the identity (the paper: "not
inverted") or with norm="gradient" its true gradient at the recorded forward input.

Modes: "unit" keeps one position of the channel (the default, the paper's
figures); "map" keeps the channel's whole map of that image.

Equivalently, a projection is the vector-Jacobian product of the kept
activations with respect to the input, with every ReLU's backward replaced by
ReLU(incoming gradient): `reference.gradient_reference` computes that with autograd (the
SLOW reference, for tests), and `relative_error` is the agreement measure

    err = max|P - R| / max|R|,   R = value * d a / d x   (unit mode)

i.e. the error of the projection divided by its own value, relative to the
largest gradient entry: max|P/value - grad| / max|grad|.

Speed: requests are grouped by layer and each group goes down the graph once as a
batch (one request = one sample; its switches are gathered per request). The
signal of a unit never leaves its receptive field, so at every node the work
is done on a window that just holds the field (clipped to the map, common size
per batch, its own offset per request): for a conv5 unit of ZFNet at 224 px
the conv1 level is a 67 x 67 window instead of 110 x 110. The results equal
the full-map computation exactly (the window always contains every position
the signal can reach). Only the request's own channel enters the top
conv's transposed filter (a grouped convolution, or for one unit just a scaled
filter).

Switches: {pool name: LongTensor (N, C, H_out, W_out)} in F.max_pool2d's
layout (flat index into the pool's input map), N indexing `Request.image`.
They come either from the store (`atlas.deconv.switches.decode`, valid inside the
unit's receptive field -- enough for unit mode) or from the images
(`switches_from_images`, valid everywhere -- needed for map mode).

A projection through an op without a rule is refused with an AtlasError naming
the op and the module it sits in (`check_graph`); the trace itself is checked
against the model's own forward on a build's first batch (atlas.net.graph).
"""

from .engine import project, project_images
from .forward import record, switches_from_images
from .graph_engine import METHODS, check_graph
from .reference import gradient_reference, relative_error
from .requests import MODES, NORMS, ForwardRecord, Projections, Request, as_request

__all__ = ["METHODS", "MODES", "NORMS", "check_graph", "ForwardRecord", "Projections", "Request", "as_request",
           "gradient_reference", "project", "project_images", "record", "relative_error", "switches_from_images"]
