"""A run's files: weights (final.pt, snapshots/) in the format `atlas.load_model` reads, the resumable
checkpoint, metrics.csv. Each is written atomically."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import AtlasError
from ..util.files import atomic_write_bytes, torch_save_atomic

CHECKPOINT_FORMAT = 1
METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_top1_error", "val_loss", "val_top1_error",
                  "val_top5_error", "images_per_s", "train_seconds", "epoch_seconds"]


def save_weights(path: Path, net: nn.Module, meta: dict[str, Any]) -> None:
    state = {k: v.detach().to("cpu").clone() for k, v in net.state_dict().items()}
    torch_save_atomic(path, {"model_state": state, "meta": meta})


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in METRIC_COLUMNS})
    atomic_write_bytes(path, out.getvalue().encode())


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """RUN_DIR/metrics.csv as a list of dicts of numbers."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise AtlasError(f"training run '{run_dir}' has no metrics.csv")
    with open(path, newline="") as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]
