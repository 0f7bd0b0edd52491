"""The bytes of an exported site by kind, and what a whole layer would weigh.

    python scripts/site_bytes.py SITE [--channels N] [--images D]

Prints every file of SITE (an `atlas export` folder) in one of these kinds, with its count, bytes and
bytes per exported channel:

    channel pages   LAYER/C.html         channel JSON   LAYER/C.json
    projections     LAYER/img/C-R.webp   panels         LAYER/img/C-panel.webp (--panels)
    layer pages     LAYER/index.*        feature vis    LAYER/img/*fv* (when exported)
    patches         img/patches/*        image pages    images/*.html, images/*.json
    image pictures  images/img/*         record         .atlas-export.json
    shared          static/*, index.*, img/*.png, analyses/, compare.* (everything else)

Then the extrapolation to whole layers (each exported layer at its channel count from its index.json,
or N channels with --channels; one layer exported is what it is made for):

- a channel's own files (its page, JSON, projections, panel) and its lines in the record scale with the
  channels; a layer page is its tiles (scaling) plus the rest of the page (fixed);
- the distinct images in the top-k grow with the channels up to the dataset's D images (its count in
  index.json, or --images), and the patches and image pictures with them (one per image where the field
  covers the image; a few per image otherwise);
- an image page is its fixed part, plus per top-k entry it holds: its share of the JSON, and in the HTML
  a card with pictures for the first CARDS of a layer (atlas/export/__init__.py) and a link in one line for
  the others; the entries per image grow with the channels (each image's count times the scale, at
  least one), and the bytes of a card, of a link and of a JSON entry are the site's own averages (a site
  with no image listing links yet: a link is taken as a card, an overestimate);
- shared assets stay as they are.

It is an estimate from the channels exported: quote it with how many.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atlas.export import CARDS  # noqa: E402  (an image page's entries with pictures, per layer)

KINDS = ["channel pages", "channel JSON", "projections", "panels", "feature vis", "layer pages", "patches",
         "image pages", "image pictures", "record", "shared"]
PER_CHANNEL = {"channel pages", "channel JSON", "projections", "panels", "feature vis", "layer pages", "record"}


def kind_of(rel: str, layers: set[str]) -> str:
    parts = rel.split("/")
    if rel == ".atlas-export.json":
        return "record"
    if parts[0] in layers:
        if len(parts) == 2:
            if re.fullmatch(r"\d+\.html", parts[1]):
                return "channel pages"
            if re.fullmatch(r"\d+\.json", parts[1]):
                return "channel JSON"
            return "layer pages"
        if parts[1] == "img":
            if parts[-1].endswith("-panel.webp"):
                return "panels"
            if re.fullmatch(r"\d+-\d+\.webp", parts[-1]):
                return "projections"
            return "feature vis"
    if rel.startswith("img/patches/"):
        return "patches"
    if rel.startswith("images/img/"):
        return "image pictures"
    if rel.startswith("images/"):
        return "image pages"
    return "shared"


def measure(site: Path) -> dict:
    index = json.loads((site / "index.json").read_text())
    layers = {la["layer"]: la for la in index["layers"] if la.get("href")}
    sizes: dict[str, list[int]] = {k: [] for k in KINDS}
    for p in sorted(site.rglob("*")):
        if p.is_file() and not p.name.startswith(".") or p.name == ".atlas-export.json":
            sizes[kind_of(p.relative_to(site).as_posix(), set(layers))].append(p.stat().st_size)
    # a layer page's tiles: the HTML from the tiles' box to the end of <main>, the JSON's "tiles"
    tiles = 0
    for name in layers:
        html = (site / name / "index.html").read_text(encoding="utf-8")
        i, j = html.find('id="tiles"'), html.find("</main>")
        tiles += len(html[i:j].encode()) if 0 <= i < j else 0
        tiles += len(json.dumps(json.loads((site / name / "index.json").read_text())["tiles"],
                                separators=(",", ":"), ensure_ascii=False).encode())
    # image pages: per page its held entries (per layer), the bytes of its cards, links and JSON entries
    pages = []
    for j in sorted((site / "images").glob("*.json")):
        twin = json.loads(j.read_text())
        held = twin.get("held") or []
        html = j.with_suffix(".html").read_text(encoding="utf-8") if j.with_suffix(".html").is_file() else ""
        cards = re.findall(r'<figure class="rank[^"]*">.*?</figure>', html, re.S)
        more = re.search(r'<p class="held-more">(.*?)</p>', html, re.S)
        links = more.group(1).count("<a ") if more else 0
        per_layer: dict[str, int] = {}
        for h in held:
            per_layer[h["layer"]] = per_layer.get(h["layer"], 0) + 1
        json_held = len(json.dumps(held, separators=(",", ":"), ensure_ascii=False).encode())
        pages.append({"bytes": j.stat().st_size + len(html.encode()), "per_layer": per_layer,
                      "cards": len(cards), "card_bytes": sum(len(c.encode()) for c in cards),
                      "links": links, "link_bytes": len(more.group(1).encode()) if more else 0,
                      "json_held": json_held, "held": len(held)})
    return {"sizes": sizes, "exported": {n: la["exported"] for n, la in layers.items()},
            "channels": {n: la["channels"] for n, la in layers.items()}, "tiles": tiles,
            "dataset": (index.get("dataset") or {}).get("ok") or (index.get("dataset") or {}).get("count"),
            "image_pages": pages}


def image_pages_then(pages: list[dict], scale: float, held_then: float, cards_cap: int) -> tuple[float, dict]:
    """The image pages' bytes with each entry count times `scale` and `held_then` pages (see the module's
    docstring), and the figures it used."""
    n = len(pages)
    if not n:
        return 0.0, {}
    cards = sum(p["cards"] for p in pages)
    links = sum(p["links"] for p in pages)
    held = sum(p["held"] for p in pages)
    card_b = sum(p["card_bytes"] for p in pages) / max(cards, 1)
    link_b = sum(p["link_bytes"] for p in pages) / links if links else card_b
    json_b = sum(p["json_held"] for p in pages) / max(held, 1)
    base = sum(p["bytes"] - p["card_bytes"] - p["link_bytes"] - p["json_held"] for p in pages) / n
    total = 0.0
    for p in pages:
        for e in p["per_layer"].values():
            e2 = max(1.0, e * scale)
            c2 = min(e2, cards_cap)
            total += c2 * card_b + (e2 - c2) * link_b + e2 * json_b
    total = total / n * held_then + base * held_then
    return total, {"base": base, "card": card_b, "link": link_b, "json": json_b, "entries": held * scale}


def report(m: dict, whole: int | None = None, images: int | None = None, cards: int = CARDS, out=sys.stdout) -> dict:
    sizes, n = m["sizes"], sum(m["exported"].values())
    target = whole if whole is not None else sum(m["channels"].values())
    scale = target / max(n, 1)
    held = len(m["image_pages"])
    d = images or m["dataset"] or held
    held_then = min(d, held * scale) if held else 0
    pages_then, fig = image_pages_then(m["image_pages"], scale, held_then, cards)
    est = {}
    print(f"{'kind':16s} {'files':>7s} {'bytes':>12s} {'per channel':>12s}   whole ({target} channels)", file=out)
    for k in KINDS:
        b = sum(sizes[k])
        if k == "layer pages":
            e = b - m["tiles"] + m["tiles"] * scale
        elif k in PER_CHANNEL:
            e = b * scale
        elif k == "image pages":
            e = pages_then
        elif k in ("patches", "image pictures"):
            e = b * (held_then / held) if held else b
        else:
            e = b
        est[k] = e
        print(f"{k:16s} {len(sizes[k]):7d} {b:12,d} {b / max(n, 1):12,.0f}   {e / 1e6:9.2f} MB", file=out)
    total = sum(sum(v) for v in sizes.values())
    print(f"{'total':16s} {sum(len(v) for v in sizes.values()):7d} {total:12,d} {total / max(n, 1):12,.0f}   "
          f"{sum(est.values()) / 1e6:9.2f} MB", file=out)
    print(f"\n{n} channel{'s' if n != 1 else ''} exported of {sum(m['channels'].values())} "
          f"({', '.join(f'{k}: {v}' for k, v in m['exported'].items())}); {held} images held of {d}.", file=out)
    if fig:
        print(f"Image pages: {fig['base']:,.0f} B a page, and per entry {fig['card']:,.0f} B as a card, "
              f"{fig['link']:,.0f} B as a link, {fig['json']:,.0f} B of JSON; whole: {held_then:.0f} pages, "
              f"{fig['entries']:,.0f} entries, cards up to {cards} a layer.", file=out)
    return est


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("site", type=Path)
    ap.add_argument("--channels", type=int, default=None,
                    help="extrapolate to this many channels (default: the exported layers' channel counts)")
    ap.add_argument("--images", type=int, default=None,
                    help="images in the dataset (default: the site's index.json)")
    ap.add_argument("--cards", type=int, default=CARDS,
                    help="an image page's entries with pictures per layer (default: the export's, %(default)s)")
    args = ap.parse_args(argv)
    if not (args.site / "index.json").is_file():
        sys.exit(f"'{args.site}' is not an exported atlas site (no index.json)")
    report(measure(args.site), args.channels, args.images, args.cards)


if __name__ == "__main__":
    main()
