"""Training with the paper's recipe (Zeiler & Fergus 2014, section 3).

The recipe (paper.md, "Training recipe"), in `recipe`: SGD with momentum 0.9, mini-batch 128, lr
1e-2 lowered by a factor 10 when the validation error stops falling (the paper did it by hand; here
ReduceLROnPlateau on validation top-1 error), dropout 0.5 in fc6/fc7, weights N(0, 1e-2) and biases
0, and after every update every conv filter whose RMS exceeds 0.1 is rescaled to RMS 0.1
(`trainer`). Images: random `crop` x `crop` sub-crops of the `resize` x `resize` centre crop and
horizontal flips (`pipeline`). Weight decay is not stated in the paper: 5e-4 is AlexNet's.

Why a resumed run is exact: epoch e's data order, crop offsets and flips come from a generator seeded
by (seed, e), and the global RNG (dropout) is reseeded from (seed, e) at the start of the epoch, so a
run resumed from the checkpoint of epoch e-1 sees exactly what the uninterrupted run saw; on CPU the
final weights are bit-identical (on CUDA, cuDNN kernels may not be deterministic).

A run's folder (`checkpoints`): config.json (every option, resolved), metrics.csv, curves.png
(`curves`), checkpoint.pt (after every epoch), snapshots/epoch-NNN.pt and final.pt, which
`atlas.load_model(NAME, weights=...)` and `atlas build --weights` read. Usage: `atlas train --help`
and the README.
"""
from .checkpoints import read_metrics
from .pipeline import crop_flip, crop_flip_gather, decode_squares
from .recipe import MODEL_DEFAULTS, PAPER_DEFAULTS, holdout_split, parse_epochs
from .run import TrainOptions, train
from .trainer import Trainer, conv_filter_rms, renormalize_filters

__all__ = ["MODEL_DEFAULTS", "PAPER_DEFAULTS", "TrainOptions", "Trainer", "conv_filter_rms", "crop_flip", "crop_flip_gather",
           "decode_squares", "holdout_split", "parse_epochs", "read_metrics", "renormalize_filters", "train"]
