"""Comparing two atlases: the same units across checkpoints, seeds and models (Li et al. 2016,
"Convergent learning").

    from atlas.compare import compare, Comparison
    c = compare("run1-atlas", "run2-atlas", "cmp")   # or `atlas compare run1-atlas run2-atlas --out cmp`
    c.layer_pairs                                    # match quality per layer pair (a Table)
    c.counterpart("conv3", 5)                        # conv3 channel 5 of A: its one-to-one match in B
    c.pair("conv3", 5)                               # both figure-2 panels side by side
    c.query("SELECT * FROM matches JOIN a.channels ...")

stats: the streamed correlations and the matching; pairing: the shared images and their statistics
streamed in pairs; run: the comparison job and its folder; result: the folder opened (SQL, pictures,
notebook display); figures: the side-by-side panels.
"""
from .result import Comparison, is_comparison
from .run import compare, correlations, layer_pairs

__all__ = ["Comparison", "compare", "correlations", "is_comparison", "layer_pairs"]
