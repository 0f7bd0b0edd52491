"""Every closed list of choices an option takes, in one place, importing nothing: the CLI offers them
without loading torch or numpy (`atlas --help`, a cache hit), and the code that acts on them imports them
from here, so a new choice is added once."""

# projections (atlas/deconv, atlas/pictures/projections.py)
MODES = ("unit", "map")                    # one unit's projection, or the whole feature map's
NORMS = ("identity", "gradient")           # contrast normalisation passed through, or its true gradient
METHODS = ("deconvnet", "guided")          # the paper's DeconvNet, or guided backpropagation
SWITCHES = ("auto", "stored", "recompute")  # where a projection's max-pool switches come from
DISPLAYS = ("percentile", "max")           # how values become grey levels (atlas/pictures/drawing.py says each rule)
DEFAULT_DISPLAY = "percentile"

# the build (atlas/build/__init__.py, atlas/data/inputs.py)
PRECISIONS = ("fp32", "bf16")
DECODERS = ("auto", "cpu", "device")

# occlusion (atlas/analyses): how the occluded images go forward, and what fills the occluder
FORWARDS = ("incremental", "full")
OCCLUDER_FILLS = ("grey", "mean")          # grey first: the default
INVARIANCE_FILLS = ("mean", "grey")        # what fills the border a transformation leaves; mean first

# the occlusion figure's panels, in the paper's order: the figure, the site and the notebook list them so
OCCLUSION_PANELS = ("image", "activation", "projection", "probability", "top_class")
