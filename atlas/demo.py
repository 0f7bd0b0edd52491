"""`atlas demo`: the whole pipeline on the embedded `shapes` dataset.

Generate the dataset (deterministic), train zfnet-mini on it with `atlas.train`,
build the atlas over the whole dataset, and say what to try next.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

# 8,000 images for 8 epochs: ~89 % validation accuracy on 12 classes (chance 8 %), about 40 s of
# training on 2 cores; conv1 grows oriented edge and colour-opponent filters (zfnet-mini starts it near
# zero for that, atlas/models/zfnet.py). The quick run only shows the path.
FULL = {"images": 8000, "epochs": 8, "snapshots": "1,2,4,8"}
QUICK = {"images": 400, "epochs": 1, "snapshots": "1"}
# A modern net (a ResNet...) at the demo's 64 px, on fewer images: its forward and backward pass costs
# several times zfnet-mini's. Trained with the BatchNorm departures of the recipe (atlas help training).
MODERN = {"images": 4000, "epochs": 6, "snapshots": "1,3,6"}
SIDE = 64


def run_demo(out: str | Path = "atlas-demo", quick: bool = False, progress: bool | None = None,
             log: Callable[[str], None] = print, model: str = "zfnet-mini") -> Path:
    from .build import build
    from .data.shapes import generate
    from .models.registry import trainable_names
    from .train import train
    from .errors import AtlasError

    if model not in trainable_names():
        raise AtlasError(f"--model: the demo trains zfnet-mini or a torchvision classification model such as "
                         f"resnet18, not '{model}'")
    t0 = time.perf_counter()
    out = Path(out)
    cfg = QUICK if quick else FULL if model == "zfnet-mini" else MODERN
    data = generate(out / "data" / f"shapes-{cfg['images']}", n=cfg["images"], size=SIDE, seed=0)
    log(f"[1/3] dataset: {cfg['images']} shapes images ({SIDE} px) in {data}")
    run = out / "run"
    if run.exists():
        shutil.rmtree(run)  # the demo always shows a whole run
    size = None if model == "zfnet-mini" else SIDE  # zfnet-mini is made for 64 px; a modern net is told
    train(model, str(data), run, epochs=cfg["epochs"], snapshot_epochs=cfg["snapshots"], seed=0,
          image_size=size, progress=progress, log=log)
    log(f"[2/3] trained {model} for {cfg['epochs']} epoch(s): {run / 'final.pt'}")
    path = build(model, str(data), out / "atlas", weights=str(run / "final.pt"), k=9, overwrite=True,
                 image_size=size, progress=progress, log=log)
    log(f"[3/3] atlas built over the whole dataset in {time.perf_counter() - t0:.0f} s total")
    log(next_steps(path))
    return path


def next_steps(path: Path) -> str:
    """What to try on the demo's atlas (tests/test_demo.py checks that each is a command of the CLI)."""
    from .store import AtlasReader

    p = str(path)
    names = AtlasReader(path).layer_names  # zfnet-mini's conv1..conv5, a ResNet's maxpool, layer1..layer4
    deep, mid = names[-1], names[len(names) // 2]
    tries = [
        ("info", f"atlas info {p}", "what is in it"),
        ("channels", f"atlas channels {p} {deep} --sort max --desc --limit 10", f"the strongest {deep} channels"),
        ("top", f"atlas top {p} {deep} 0", "a channel's top-9 images"),
        ("sql", f"atlas sql {p} -q class_selectivity -p label=circle", "channels most selective for circles"),
        ("show", f"atlas show {p} {mid} 5", "the paper's figure 2 panel for one channel"),
        ("filters", f"atlas filters {p}", "the learned conv1 filters"),
        ("similar", f"atlas similar {p} --image-id 0", "images the network sees as alike"),
        ("occlude", f"atlas occlude {p} 0", "occlusion sensitivity, the paper's figure 7"),
        ("evolution", f"atlas evolution {path.parent / 'run'}", "features over training, figure 4"),
        ("export", f"atlas export {p} {p}-site", "a browsable static site"),
    ]
    lines = [f"\nYour atlas: {p}\nTry next:"]
    for _, line, why in tries:
        lines.append(f"  {line:<62} # {why}")
    return "\n".join(lines)
