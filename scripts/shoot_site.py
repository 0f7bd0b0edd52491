"""Screenshots of an exported site's pages in headless Chromium (what the README's figures are), and the
weight of a layer page before scrolling: the bytes the page fetches at load, the requests, and how long
sorting and filtering all its tiles take.

    python scripts/shoot_site.py SITE conv5/index.html conv5/17.html --out shots/ [--width 1200 --height 900]
        one PNG per page (the viewport, scaled by --scale), named after the page
    python scripts/shoot_site.py SITE --weigh conv2/index.html
        what loads before scrolling, and the time of a sort (max, high first) and a filter (live only)
        over every tile, best of 3
    python scripts/shoot_site.py --smoke   # seconds: a tiny atlas, exported, one shot and one weighing

Chromium: /usr/bin/chromium (or $ATLAS_CHROMIUM), driven by Playwright, as tests/test_export_browser.py does.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--no-default-browser-check"]


def chromium() -> str:
    for name in (os.environ.get("ATLAS_CHROMIUM"), "/usr/bin/chromium", "chromium", "chromium-browser",
                 "google-chrome"):
        if name and (shutil.which(name) or os.path.isfile(name)):
            return shutil.which(name) or name
    raise SystemExit("no Chromium (set ATLAS_CHROMIUM)")


def _browser(p, width: int, height: int):
    profile = tempfile.mkdtemp(prefix="atlas-shoot-")
    ctx = p.chromium.launch_persistent_context(profile, executable_path=chromium(), headless=True, args=ARGS,
                                               viewport={"width": width, "height": height})
    return ctx, profile


def shoot(site: Path, pages: list[str], out: Path, width: int, height: int, scale: float,
          full: bool = False, clip_height: int | None = None) -> list[Path]:
    from PIL import Image
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    made = []
    with sync_playwright() as p:
        ctx, profile = _browser(p, width, height)
        try:
            for rel in pages:
                page = ctx.new_page()
                page.goto((site / rel).as_uri())
                page.wait_for_load_state("load")
                page.wait_for_timeout(400)  # the lazily loaded pictures of the first screen
                # pictures still coming, at most 5 s (a browser's own loading="lazy" may never fetch some)
                page.evaluate("() => Promise.race([new Promise(r => setTimeout(r, 5000)), Promise.all("
                              "Array.from(document.images).filter(i => i.src && !i.complete)"
                              ".map(i => new Promise(r => { i.onload = i.onerror = r; })))])")
                name = rel.replace("/", "-").replace(".html", "") + ".png"
                tmp = out / (".raw-" + name)
                page.screenshot(path=str(tmp), full_page=full)
                page.close()
                with Image.open(tmp) as im:
                    im = im.convert("RGB")
                    if clip_height:
                        im = im.crop((0, 0, im.width, min(im.height, clip_height)))
                    if scale != 1:
                        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
                    im.save(out / name, optimize=True)
                tmp.unlink()
                made.append(out / name)
        finally:
            ctx.close()
            shutil.rmtree(profile, ignore_errors=True)
    return made


def weigh(site: Path, rel: str, width: int, height: int) -> dict:
    """What a page fetches before any scrolling, and how long its sort and filter take over every tile."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        ctx, profile = _browser(p, width, height)
        try:
            page = ctx.new_page()
            fetched: list[str] = []
            page.on("request", lambda r: fetched.append(r.url))
            t0 = time.perf_counter()
            page.goto((site / rel).as_uri())
            page.wait_for_load_state("load")
            page.wait_for_timeout(500)
            load_s = time.perf_counter() - t0
            at_load = list(fetched)  # what loaded before any scrolling or sorting (those fetch more)
            files = [Path(u[len("file://"):]) for u in at_load if u.startswith("file://")]
            from urllib.parse import unquote

            files = [Path(unquote(str(f))) for f in files]
            sizes = {str(f): f.stat().st_size for f in files if f.is_file()}
            tiles = page.evaluate("document.querySelectorAll('#tiles .tile').length")
            tile_imgs = page.evaluate("document.querySelectorAll('#tiles img').length")
            timings = {}

            def set_(sel: str, value: str, timed: bool) -> float:
                # the change handler and the layout it causes (offsetHeight forces it), in the page's clock
                return page.evaluate("([sel, value]) => { const t = performance.now();"
                                     " const s = document.getElementById(sel); s.value = value;"
                                     " s.dispatchEvent(new Event('change')); document.body.offsetHeight;"
                                     " return performance.now() - t; }", [sel, value])

            for what, sel, before, value in (("sort by max, high first", "sort", "channel", "-max"),
                                             ("sort back by channel", "sort", "-max", "channel"),
                                             ("filter: live only", "dead", "all", "live"),
                                             ("filter: all again", "dead", "live", "all")):
                best = None
                for _ in range(3):
                    set_(sel, before, False)
                    ms = set_(sel, value, True)
                    best = ms if best is None else min(best, ms)
                timings[what] = round(best, 1)
            set_("sort", "channel", False)
            set_("dead", "all", False)
            others = sorted({u.rsplit("/", 1)[-1] for u in at_load if not u.endswith(".png")})
            page.close()
        finally:
            ctx.close()
            shutil.rmtree(profile, ignore_errors=True)
    html = site / rel
    pics = {k: v for k, v in sizes.items() if k.endswith(".png")}
    return {"page": rel, "viewport": [width, height], "tiles": tiles, "tile_pictures": tile_imgs,
            "html_bytes": html.stat().st_size, "requests_at_load": len(at_load),
            "pictures_at_load": len(pics), "bytes_at_load": sum(sizes.values()),
            "picture_bytes_at_load": sum(pics.values()),
            # every tile's two pictures (rank 0's projection and patch): what a page without lazy loading fetches
            "all_tile_picture_bytes": sum(f.stat().st_size for f in (html.parent / "img").glob("*.png")
                                          if re.fullmatch(r"\d+-0(-patch)?\.png", f.name)),
            "load_s": round(load_s, 2), "interaction_ms": timings, "other_requests": others}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("site", nargs="?", type=Path)
    ap.add_argument("pages", nargs="*")
    ap.add_argument("--out", type=Path, default=Path("shots"))
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--scale", type=float, default=0.5)
    ap.add_argument("--full", action="store_true", help="the whole page, not the viewport")
    ap.add_argument("--clip-height", type=int, help="keep only this many pixels from the top (before scaling)")
    ap.add_argument("--weigh", metavar="PAGE")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from conftest import make_image_folder
        from atlas.build import build
        from atlas.export import export

        tmp = Path(tempfile.mkdtemp(prefix="atlas-shoot-smoke-"))
        data = make_image_folder(tmp / "data", per_class=4)
        a = build("zfnet-mini", str(data), tmp / "atlas", k=2, batch_size=8, image_size=32, progress=False)
        args.site = export(a, tmp / "site", layers="conv1", progress=False)
        args.pages, args.weigh, args.out = ["conv1/index.html"], "conv1/index.html", tmp / "shots"
    if args.site is None:
        ap.error("give a site folder (or --smoke)")
    if args.pages:
        for p in shoot(args.site, args.pages, args.out, args.width, args.height, args.scale, args.full,
                       args.clip_height):
            print(p)
    if args.weigh:
        res = weigh(args.site, args.weigh, args.width, args.height)
        print(json.dumps(res, indent=1))
        if args.json:
            args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
