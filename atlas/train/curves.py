"""curves.png: a run's loss and error curves, per epoch."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..util.files import atomic_write
from ..pictures.charts import font, line_panel


def plot_curves(history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Two panels -- loss, and error rates -- over epochs; dashed lines where the lr was lowered."""
    from PIL import Image, ImageDraw

    w, h = 1000, 420
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    if title:
        d.text((w // 2, 8), title, fill=(0, 0, 0), font=font(16), anchor="mt")
    ep = [r["epoch"] for r in history]
    xmax = max(ep)
    drops = [history[i]["epoch"] for i in range(1, len(history)) if history[i]["lr"] < history[i - 1]["lr"]]
    blue, orange, green, red = (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)
    line_panel(d, (0, 24, w // 2, h), [
        ("training loss", [(e, r["train_loss"]) for e, r in zip(ep, history)], blue),
        ("validation loss", [(e, r["val_loss"]) for e, r in zip(ep, history)], orange),
    ], "loss", "cross-entropy", xmax, False, drops)
    line_panel(d, (w // 2, 24, w, h), [
        ("training top-1", [(e, r["train_top1_error"]) for e, r in zip(ep, history)], blue),
        ("validation top-1", [(e, r["val_top1_error"]) for e, r in zip(ep, history)], red),
        ("validation top-5", [(e, r["val_top5_error"]) for e, r in zip(ep, history)], green),
    ], "error", "error rate", xmax, True, drops)
    return atomic_write(Path(path), lambda tmp: img.save(tmp, format="PNG"))
