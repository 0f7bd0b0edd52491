"""The DeconvNet projection engine (Zeiler & Fergus 2014, section 2.1): algorithm only, no I/O.

A projection takes one chosen activation -- image n, layer L, channel c,
position (y, x) -- keeps it, zeroes every other activation of the layer, and
runs the feature extractor backwards down to pixels. Going down, each module
of `model.features` is undone by:

    ReLU               rectify: ReLU of the signal (the forward on/off pattern is NOT used)
    Conv2d             filter with the transposed weights: conv_transpose2d with the conv's
                       weight, stride and padding (no bias), cropped to the conv's input size
    MaxPool2d          unpool: each value goes to the position that won its window in the
                       forward pass (the switches); windows overlap, so values that land on
                       one position ADD (scatter_add_, never F.max_unpool2d)
    LocalResponseNorm  identity (the paper: "not inverted"), or with norm="gradient" its
                       true gradient at the recorded forward input (Captum's choice)
    Identity, Dropout  identity (eval mode)

Modes: "unit" keeps one position of the channel (the default, the paper's
figures); "map" keeps the channel's whole map of that image.

Equivalently, a projection is the vector-Jacobian product of the kept
activations with respect to the input, with every ReLU's backward replaced by
ReLU(incoming gradient): `reference.gradient_reference` computes that with autograd (the
SLOW reference, for tests), and `relative_error` is the agreement measure

    err = max|P - R| / max|R|,   R = value * d a / d x   (unit mode)

i.e. the error of the projection divided by its own value, relative to the
largest gradient entry: max|P/value - grad| / max|grad|.

Speed: requests are grouped by layer and each group runs the chain once as a
batch (one request = one sample; its switches are gathered per request). The
signal of a unit never leaves its receptive field, so at every level the work
is done on a window that just holds the field (clipped to the map, common size
per batch, its own offset per request): for a conv5 unit of ZFNet at 224 px
the conv1 level is a 67 x 67 window instead of 110 x 110. The results equal
the full-map computation exactly (the window always contains every position
the signal can reach). Only the request's own channel enters the top
conv's transposed filter (a grouped convolution, or for one unit just a scaled
filter).

Switches: {pool name: LongTensor (N, C, H_out, W_out)} in F.max_pool2d's
layout (flat index into the pool's input map), N indexing `Request.image`.
They come either from the store (`atlas.switches.decode`, valid inside the
unit's receptive field -- enough for unit mode) or from the images
(`switches_from_images`, valid everywhere -- needed for map mode).

Models the engine cannot project exactly are refused with an AtlasError
(`check_model`): every module of `features` must be exactly one of the
supported types (a subclass may hide a functional ReLU), the modules must
reproduce `features`' output module by module on a probe input, and
`model.forward` must run `features` as one block on its raw input.
"""

from .engine import project, project_images
from .graph_engine import METHODS, check_graph
from .forward import record, switches_from_images
from .reference import gradient_reference, relative_error
from .requests import MODES, NORMS, ForwardRecord, Projections, Request, as_request
from .support import NORM_TYPES, check_model

__all__ = ["METHODS", "MODES", "NORMS", "check_graph", "NORM_TYPES", "ForwardRecord", "Projections", "Request", "as_request", "check_model",
           "gradient_reference", "project", "project_images", "record", "relative_error", "switches_from_images"]
