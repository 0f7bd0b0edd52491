"""The analyses behind the paper's figures, one module (and one library call) each; the CLI commands
of the same names are thin wrappers, imported only when a command runs.

On an atlas (sharing `common`: images, classes, layers, where results are stored):

    occlusion        figure 7: a square slid over one image -- the run (occlusion), the square
                     (occluder), the batched, windowed passes over its positions
                     (occlusion_forward), the result and its table rows (occlusion_result), the
                     figure (occlusion_figure)
    invariance       figure 5: feature distance and class probability under translation, scale
                     and rotation
    correspondence   figure 8 / table 7: how consistently a part's occlusion changes the features
                     across images

On training runs:

    evolution        figure 4: the strongest activation of chosen channels at each training
                     snapshot, projected to pixels
    compare_filters  figure 6: the conv1 filters of two models side by side, with dead-filter
                     counts and their coverage of low / mid / high spatial frequencies

The small drawing helpers below are used by the two training-run analyses."""
from __future__ import annotations

import numpy as np


def font(size: int):
    """Pillow's built-in scalable font (no font files needed)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed size
        return ImageFont.load_default()


def signed_to_uint8(a: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Signed values to display bytes: 0 -> mid-grey (128), +/-scale -> 255 / 1.

    `scale` defaults to max |a| (an all-zero array stays flat grey). Channels last or first are
    both fine: the mapping is elementwise."""
    a = np.asarray(a, dtype=np.float64)
    s = float(np.abs(a).max()) if scale is None else float(scale)
    if not s > 0:
        return np.full(a.shape, 128, dtype=np.uint8)
    return np.clip(np.rint(128.0 + 127.0 * a / s), 0, 255).astype(np.uint8)


def wrap_text(text: str, fnt, max_width: int) -> list[str]:
    """Greedy word wrap of `text` into lines no wider than max_width pixels (in font `fnt`)."""
    lines: list[str] = []
    for para in text.split("\n"):
        cur = ""
        for word in para.split(" "):
            trial = f"{cur} {word}" if cur else word
            if cur and fnt.getlength(trial) > max_width:
                lines.append(cur)
                cur = word
            else:
                cur = trial
        lines.append(cur)
    return lines


__all__ = ["font", "signed_to_uint8", "wrap_text"]
