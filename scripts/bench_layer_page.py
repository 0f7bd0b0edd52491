"""A layer page of thousands of channels (a ResNet's 2,048-channel stage, in size): what it weighs before
scrolling, and how fast its sorting and filtering are, in headless Chromium from file://.

Scenario: zfnet-mini widened so that conv3 has about --channels channels (width = channels / 3, random
weights), built over a generated ImageFolder of 12 images at 32 px with k = 1 and only conv3 recorded,
exported whole (every channel a tile with its projection and patch). Then scripts/shoot_site.py's
`weigh` opens conv3/index.html at 1200 x 900 and reports the HTML's size, the requests and bytes
fetched at load (the lazily loaded pictures: only the tiles within LAZY_MARGIN of the viewport), what
all the tiles' pictures would weigh, the load time, and the best of 3 of a sort and a filter over
every tile (the change handler and the layout it causes).

    python scripts/bench_layer_page.py [--channels 2049] [--work DIR] [--json out.json]
    python scripts/bench_layer_page.py --smoke   # seconds: about 96 channels
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, default=2049, help="conv3's channels, about (a multiple of 3)")
    ap.add_argument("--work", type=Path, help="folder for the data, atlas and site (default: a temp folder)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.channels = 96
    import torch

    sys.path.insert(0, str(HERE.parent / "tests"))
    sys.path.insert(0, str(HERE))
    from conftest import make_image_folder
    from shoot_site import weigh

    from atlas.build import build
    from atlas.export import export
    from atlas.models.registry import load_model

    work = args.work or Path(tempfile.mkdtemp(prefix="atlas-layer-page-"))
    for sub in ("data", "atlas", "site", "w.pt"):
        p = work / sub
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    width = max(1, args.channels // 3)
    data = make_image_folder(work / "data", per_class=4)
    model = load_model("zfnet-mini", width=width)
    torch.save({"model_state": model.state_dict(), "meta": {"model": "zfnet-mini", "width": width}}, work / "w.pt")
    del model
    t = time.perf_counter()
    a = build("zfnet-mini", str(data), work / "atlas", weights=str(work / "w.pt"), k=1, batch_size=4, image_size=32,
              layers="conv3", index=False, progress=False)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    site = export(a, work / "site", progress=False)
    export_s = time.perf_counter() - t
    res = weigh(site, "conv3/index.html", 1200, 900)
    res.update({"channels": 3 * width, "build_s": round(build_s, 1), "export_s": round(export_s, 1),
                "load_average": round(os.getloadavg()[0], 1)})
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
