"""What one occlusion run found: the maps over the square's positions, the class charted, and how
they are told -- the table's rows (the SQL view `occlusion`), the summary lines.

The result is a module of its own so that the figure (atlas.analyses.occlusion_figure) can read
it without importing the run (atlas.analyses.occlusion), which draws the figure.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..notebook import ShowsItsFigure
from . import common

# the table's columns, in order (common.table_schema)
COLUMNS = ("run:str image:str image_id:i32 path:str model:str layer:str channel:i32 size:i32 stride:i32 "
           "fill:str pos_y:i32 pos_x:i32 x0:i32 y0:i32 x1:i32 y1:i32 activation:f64 activation_base:f64 "
           "dataset_label:str true_class_index:i32 true_class:str class_index:i32 class_name:str "
           "class_source:str probability:f64 probability_base:f64 top_class:i32 top_class_name:str")


@dataclass
class OcclusionResult(ShowsItsFigure):
    run: str
    image: str
    image_id: int | None
    path: str
    model: str
    image_size: int
    layer: str
    channel: int
    size: int
    stride: int
    fill: str
    n: int                                   # positions per axis
    boxes: np.ndarray = field(repr=False)    # (n*n, 4) y0, x0, y1, x1
    activation: np.ndarray = field(repr=False)          # (n, n)
    fill_rgb: tuple = (128, 128, 128)        # the occluder's colour, for display
    activation_base: float = 0.0
    probability: np.ndarray | None = field(default=None, repr=False)   # (n, n) p(class_index)
    probability_base: float | None = None
    top_class: np.ndarray | None = field(default=None, repr=False)     # (n, n) class index
    top_class_base: int | None = None
    dataset_label: str | None = None         # the image's label in the dataset: a fact about the image,
                                             # a class of the model only when true_index is set
    true_index: int | None = None            # the model's class that is the image's label (None: unknown)
    class_index: int | None = None           # the class whose probability is charted
    class_source: str | None = None          # given | true | most_probable (the correct class is unknown)
    unknown_reason: str | None = None        # why the correct class is unknown, when it is
    class_names: list[str] = field(default_factory=list, repr=False)
    projection: Any = field(default=None, repr=False)  # (3, S, S) tensor, or None
    notes: list[str] = field(default_factory=list)
    table: Path | None = None
    figures: dict[str, Path] = field(default_factory=dict)
    method: str = "incremental"
    batch: int = 0
    device: str = "cpu"
    seconds: float = 0.0
    plan: str = ""

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for k, (y0, x0, y1, x1) in enumerate(self.boxes.tolist()):
            py, px = divmod(k, self.n)
            tc = None if self.top_class is None else int(self.top_class[py, px])
            out.append({
                "run": self.run, "image": self.image, "image_id": self.image_id, "path": self.path,
                "model": self.model, "layer": self.layer, "channel": self.channel, "size": self.size,
                "stride": self.stride, "fill": self.fill, "pos_y": py, "pos_x": px,
                "x0": x0, "y0": y0, "x1": x1, "y1": y1,
                "activation": float(self.activation[py, px]), "activation_base": self.activation_base,
                "dataset_label": self.dataset_label, "true_class_index": self.true_index,
                "true_class": self.true_class, "class_index": self.class_index, "class_name": self.class_name,
                "class_source": self.class_source,
                "probability": None if self.probability is None else float(self.probability[py, px]),
                "probability_base": self.probability_base,
                "top_class": tc, "top_class_name": None if tc is None else self.class_names[tc],
            })
        return out

    @property
    def class_name(self) -> str | None:
        return None if self.class_index is None else self.class_names[self.class_index]

    @property
    def true_class(self) -> str | None:
        return None if self.true_index is None or not self.class_names else self.class_names[self.true_index]

    def class_phrase(self) -> str:
        """What the charted class is, in words that claim no more than is known."""
        if self.class_source == "true":
            return f"the image's true class (its label '{self.dataset_label}')"
        if self.class_source == "given":
            extra = ""
            if self.true_index is not None and self.true_index != self.class_index:
                extra = f"; the image's true class is {self.true_class}"
            return f"the class given{extra}"
        return "the most probable class of the unoccluded image; the correct class is unknown"

    def summary(self) -> list[str]:
        n = self.n
        what = f"image {self.image_id} ({self.path})" if self.image_id is not None else self.path
        lines = [f"occlusion of {what} with {self.model} at {self.image_size} px: "
                 f"{self.size} px {self.fill} square, stride {self.stride}, {n} x {n} positions "
                 f"({n * n} forward passes in {self.seconds:.2f} s on {self.device}, {self.method}, "
                 f"batches of {self.batch})"]
        am = np.unravel_index(int(np.argmin(self.activation)), self.activation.shape)
        lines.append(f"strongest {self.layer} map for the unoccluded image: channel {self.channel}; total activation "
                     f"{self.activation_base:.4g} unoccluded, {self.activation.min():.4g} at the lowest "
                     f"({self._where(am)})")
        if self.probability is not None:
            pm = np.unravel_index(int(np.argmin(self.probability)), self.probability.shape)
            lines.append(f"p({self.class_name}) [{self.class_phrase()}]: {self.probability_base:.4f} unoccluded, "
                         f"{self.probability.min():.4f} at the lowest ({self._where(pm)})")
            vals, counts = np.unique(self.top_class, return_counts=True)
            order = np.argsort(-counts)[:5]
            share = ", ".join(f"{self.class_names[vals[i]]} {100 * counts[i] / counts.sum():.0f}%" for i in order)
            lines.append(f"most probable class over positions: {share}")
        lines += common.notes_and_table(self.notes, self.table, "occlusion", self.run)
        if self.figures:
            fig = self.figures.get("figure")
            rest = ", ".join(p.name for k, p in self.figures.items() if k != "figure")
            lines.append(f"figures: {fig} (+ {rest})")
        return lines

    def _where(self, pos) -> str:
        k = int(pos[0]) * self.n + int(pos[1])
        y0, x0, y1, x1 = self.boxes[k].tolist()
        return f"square at x {x0}..{x1 - 1}, y {y0}..{y1 - 1}"
