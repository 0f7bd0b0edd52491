"""Export an atlas as a static website: plain files that open from file:// or any static host.

The options are `atlas export --help`'s; the library call is `export(atlas_path, site_dir, ...)`.

Site layout (every address relative and stable, so a link to a unit survives a re-export):

    index.html  index.json        model, weights, dataset (and its unreadable images), k, build figures,
                                  layers, conv1 filters, analyses
    static/atlas.css, atlas.js    the only style and script (no fonts, CDNs or external anything)
    static/sql.js                 the channel and image pages' SQL, once (gather.sql_templates): atlas.js
                                  writes each page's queries into it, from the page's layer and number
    img/conv1-filters.png         the first layer's filters (figure 6)
    conv3/index.html  .json       a layer: every channel as a tile, sortable and filterable in the page
    conv3/17.html  conv3/17.json  a channel: figure-2 panel's cells, statistics, histogram, label mix,
                                  similar channels, the SQL behind its numbers, prev/next/up
    conv3/img/17-panel.webp       with --panels: the figure-2 panel as one picture (the page shows its cells
                                  either way; `atlas show` gives it as PNG)
    conv3/img/17-0.webp           rank 0's projection (and so on per rank); a large field's cell at
                                  the size it is read (images.SITE_CELL), the cache's PNG at a slide's
    img/patches/HASH.webp         an image patch, named by its bytes' hash: one file however many channels
                                  show it (a deep unit's patch is the whole image, in many top-k)
    images/42.html  .json         an image in an exported channel's top-k: the image, its strongest
                                  channels per layer (the activations table), the top-k entries it holds
    images/img/42.webp            the image as the net saw it (its crop at the model's input size), unless
                                  a patch in the site is the whole image (a deep unit's): the page shows that
    analyses/NAME.html  .json     a page per analysis found under ATLAS/analyses/NAME/
    compare.html  .json           with --compare DIR: each unit beside its counterpart in the other atlas
                                  (atlas/export/comparison.py); channel pages link to their row there
    .atlas-export.json            the site's own record: the key of every file's inputs
    .atlas-export.journal         while an export runs: the files it is writing (gone when it finishes)

Every page has a JSON twin beside it holding the same data (like Datasette), compact (for programs).
Pictures come from the lazy renderer's cache (inside the atlas, or the
per-user one when the atlas is read-only) as lossy WebP, each made once beside
its PNG in the cache (atlas/export/images.py: WEB_QUALITY), and are hardlinked
into the site (copied across file systems). The PNGs, with their text chunks,
stay in the cache: `atlas show ATLAS LAYER CHANNEL --out DIR` copies a panel
out for a slide. The first layer's filter grid stays PNG (pixel art).

One writer at a time: an export holds the site's writer lock (atlas/util/lock.py,
`.SITE.lock` beside the folder) from before it reads the site's record until it
has saved it; a second export of the same site is refused in one line naming
the holder, and touches nothing.

Re-exporting makes the site what was asked, no more: files whose inputs did
not change are not touched (a second export of an unchanged atlas does almost
nothing); pages and pictures an earlier export wrote that this one does not
(fewer channels, other layers, another atlas, an export killed half-way) are
removed, from the site's own record (site.py), and files the export never
wrote are left alone. Each file is written atomically, pictures before the
pages that show them.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import AtlasError
from ..util.progress import Progress
from . import featurevis as fvx
from . import gather
from ..pictures.projections import DEFAULT_DISPLAY
from .images import SITE_CELL, Pictures
from .site import STATE, Site, key_of

EXPORT_VERSION = 1
PACKAGE = Path(__file__).resolve().parent.parent
TEMPLATES = PACKAGE / "templates"
STATIC = PACKAGE / "static"
RESERVED = {"static", "img", "analyses", "index", "images"}
# the image patches, shared by every page that shows one (named by the hash of their bytes): a deep unit's
# patch is the whole image, in the top-k of many channels
PATCHES = "img/patches"
SQL_JS = "static/sql.js"  # the channel and image pages' SQL, written by the export (not a file of STATIC)
# an image page's entries shown with their pictures, per layer (the strongest); the others are one line of links
# each: a resnet50 layer4's 18,432 top-k entries over 40 images were 9 MB of image pages as pictures
CARDS = 24
CHUNK = 32  # channels whose pictures are asked for in one call
GLANCE = 6  # channels per layer on the index: the strongest exported ones, by their maximum
# the footer's word on how projections are shown (the rule in full is in each PNG's text)
DISPLAY_NOTES = {
    "percentile": "Projections are shown with zero as mid-grey, each scaled by the 99.5th percentile of its "
                  "absolute values inside the receptive field (the few larger values clipped to black or white).",
    "max": "Projections are shown with zero as mid-grey, each scaled by its own largest absolute value.",
}

__all__ = ["export", "parse_channels", "EXPORT_VERSION"]


def export(atlas_path: str | Path, site_dir: str | Path, *, layers: str | Iterable[str] | None = None,
           channels: str | Iterable[int] | None = None, max_channels: int | None = None,
           cache: str | Path | None = None, progress: bool | None = None,
           log: Callable[[str], None] | None = None, display: str = DEFAULT_DISPLAY,
           feature_vis: bool = False, compare: str | Path | None = None, panels: bool = False) -> Path:
    """Write (or bring up to date) the static site of an atlas, exactly the layers and channels asked
    for; returns the site folder. `cache`: the picture cache to use instead of the atlas's; `display`:
    how projections' values become grey levels (atlas.pictures.drawing.DISPLAYS: percentile or max);
    `feature_vis`: render the channels' missing feature visualizations (without it the pages show those
    already cached and draw none: atlas/export/featurevis.py); `compare`: a comparison folder (`atlas compare`)
    of this atlas with another, for the comparison section (atlas/export/comparison.py); `panels`: ship each
    channel's figure-2 panel as one picture too (the page shows its cells either way: a panel is most of a
    channel's bytes, and `atlas show` gives it as PNG)."""
    from ..util.lock import writer_lock
    from ..facade import Atlas
    from ..pictures.projections import _check_options

    log = log or (lambda s: None)
    t0 = time.perf_counter()
    _check_options("unit", "identity", "auto", display)
    a = atlas_path if isinstance(atlas_path, Atlas) else Atlas(atlas_path)
    selection = _selection(a, layers, channels, max_channels)
    comparison = None
    if compare is not None:
        from .comparison import SiteComparison

        comparison = SiteComparison(a, compare)
    with writer_lock(Path(site_dir), "an export"):
        site = Site(Path(site_dir))
        try:
            return _export(a, site, selection, cache, progress, log, t0, display, feature_vis=feature_vis,
                           comparison=comparison, panels=panels)
        finally:
            site.close()


def _export(a, site: Site, selection: dict[str, list[int]], cache, progress, log, t0: float,
            display: str = DEFAULT_DISPLAY, feature_vis: bool = False, comparison=None, panels: bool = False) -> Path:
    from ..pictures.cache import identity as atlas_identity

    site.remove_temps()
    identity = atlas_identity(a)
    state = site.state
    code = _code_hash()
    fingerprint = key_of(identity, _atlas_files(a), code, selection, display, EXPORT_VERSION)
    if comparison is not None:  # only then: a site exported without one keeps its fingerprint
        fingerprint = key_of(fingerprint, comparison.key())
    if panels:
        fingerprint = key_of(fingerprint, "panels")
    base, fingerprint = fingerprint, key_of(fingerprint, fvx.state(a, selection, cache, feature_vis))
    dataset = Path(a.manifest["dataset"]["root"])
    # pictures drawn with an image missing are redrawn once it is back, so while the dataset is there such
    # a site is never "up to date" (the full pass finds every other picture in the cache: seconds, not minutes)
    waiting = state.get("incomplete") and dataset.exists()
    if state.get("fingerprint") == fingerprint and not waiting and not site.interrupted and \
            all((site.root / r).is_file() for r in state.get("files", {})):
        dt = time.perf_counter() - t0
        _warn_incomplete(log, dataset, state.get("incomplete") or 0, None)
        log(f"site '{site.root}' is up to date ({len(state['files'])} files, checked in {dt:.2f} s)")
        _save_run(site, state, {"seconds": round(dt, 3), "up_to_date": True})
        return site.root

    total = sum(len(v) for v in selection.values())
    pics = Pictures(a, cache=cache, display=display)
    ex = _Exporter(a, site, pics, selection, code, log)
    ex.comparison = comparison
    ex.feature_vis = (feature_vis, cache)
    ex.panels = panels
    with Progress(total, "export", "channels", enabled=progress) as bar:
        ex.run(bar)
    if feature_vis:  # what it rendered is cached now: the next export finds the site up to date
        fingerprint = key_of(base, fvx.state(a, selection, cache, feature_vis))
    removed = site.prune()
    dt = time.perf_counter() - t0
    run = {"seconds": round(dt, 3), "picture_seconds": round(pics.seconds, 3), "pictures_rendered": pics.rendered,
           "images_rendered": pics.images_rendered, "webp_encoded": pics.encoded,
           "webp_seconds": round(pics.web_seconds, 3), "files_shared": len(set(site.aliases.values())),
           "picture_split": pics.split,
           "channels": total, "files_written": site.written, "files_linked": site.linked,
           "files_kept": site.skipped, "files_removed": removed, "up_to_date": False}
    site.save(version=EXPORT_VERSION, identity=identity, fingerprint=fingerprint, selection=selection,
              atlas=str(Path(a.path).resolve()), incomplete=ex.incomplete + ex.incomplete_images, last_run=run)
    _warn_incomplete(log, dataset, ex.incomplete, ex.errors[0] if ex.errors else None, ex.incomplete_images)
    log(f"site written to {site.root}: {total} channel pages; {site.written} files written, {site.linked} pictures "
        f"linked, {site.skipped} unchanged, {removed} removed; {dt:.1f} s ({pics.seconds:.1f} s making pictures)")
    return site.root


def _warn_incomplete(log, dataset: Path, incomplete: int, first: str | None, images: int = 0) -> None:
    pages = f"{incomplete} channel page{'s' if incomplete != 1 else ''}"
    if images:
        pages += f" and {images} image page{'s' if images != 1 else ''}"
    incomplete += images
    if not dataset.exists():
        log(f"Warning: the atlas's dataset folder '{dataset}' is gone: image patches are placeholders "
            f"({pages} say incomplete); projections need only the stored switches")
    elif incomplete:
        log(f"Warning: {pages} have incomplete pictures (first: {first}); a later export redraws them once "
            "the images are back")


def parse_channels(spec: str | Iterable[int] | None) -> list[int] | None:
    """'0-15,17' or [0, 1, 17] -> sorted channel numbers (None: all)."""
    if spec is None:
        return None
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, str):
        out: set[int] = set()
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            try:
                if "-" in part[1:]:
                    lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                    lo_i, hi_i = int(lo), int(hi)
                    if hi_i < lo_i:
                        raise ValueError
                    out.update(range(lo_i, hi_i + 1))
                else:
                    out.add(int(part))
            except ValueError:
                raise AtlasError(f"--channels: '{part}' is not a channel number or range like 0-15") from None
        return sorted(out)
    return sorted({int(c) for c in spec})


def _selection(a, layers, channels, max_channels) -> dict[str, list[int]]:
    if isinstance(layers, str):
        layers = [s.strip() for s in layers.split(",") if s.strip()]
    names = list(layers) if layers else list(a.layer_names)
    for n in names:
        a.check_layer(n)
    if max_channels is not None and max_channels < 1:
        raise AtlasError(f"--max-channels must be at least 1 (got {max_channels})")
    chans = parse_channels(channels)
    counts = {la["layer"]: la["channels"] for la in a.manifest["layers"]}
    out = {}
    for n in a.layer_names:  # atlas order
        if n not in names:
            continue
        _slug(n)
        if chans is None:
            sel = list(range(counts[n]))
        else:
            bad = [c for c in chans if not 0 <= c < counts[n]]
            if bad:
                raise AtlasError(f"channel {bad[0]} is out of range for {n} (0..{counts[n] - 1})")
            sel = list(chans)
        out[n] = sel[:max_channels] if max_channels else sel
    return out


def _whole_image(r: dict[str, Any], layer: dict[str, Any], size: int) -> bool:
    """Whether a top-k entry's patch is the whole image and nothing else: its field, as the patch draws it
    (atlas.pictures.drawing.shown_box), is the image (a deep layer's unit, whose field covers it)."""
    from ..pictures.drawing import shown_box

    if not layer.get("jump"):  # a unit that sees the whole image (after a global pool)
        box = (r["x0"], r["y0"], r["x1"], r["y1"])
    else:
        x0, y0 = layer["offset"] + r["x"] * layer["jump"], layer["offset"] + r["y"] * layer["jump"]
        box = (x0, y0, x0 + layer["rf_size"], y0 + layer["rf_size"])
    return tuple(shown_box(box, size)) == (0, 0, size, size)


def _site_cell(layer: dict[str, Any], size: int) -> int | None:
    """The side a layer's projections are shrunk to on the site (images.SITE_CELL), or None: only cells drawn
    at or below their field's own scale (a photo-like picture), never one enlarged with NEAREST (pixel art)."""
    from ..pictures.drawing import cell_factor

    field = min(int(layer["rf_size"]), size) if layer.get("jump") and layer.get("rf_size") else size
    f = cell_factor(field)
    return SITE_CELL if f <= 1 and field * f > SITE_CELL else None


def _split_cards(held: list[dict[str, Any]], cards: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """An image page's top-k entries (strongest first within each layer): the first `cards` of each layer,
    shown with their pictures, and the others, listed as links."""
    shown, more, per_layer = [], [], {}
    for h in held:
        n = per_layer[h["layer"]] = per_layer.get(h["layer"], 0) + 1
        (shown if n <= cards else more).append(h)
    return shown, more


def _image_href(image_id: int) -> str:
    """An image's page, from a page one folder down (a layer's, an image's)."""
    return f"../images/{int(image_id)}.html"


def _slug(layer: str) -> str:
    """The layer's folder name: its own name, which must be a plain file name (module paths such as
    `features.denseblock3` or `layer3.1` are: dots inside, never first, never two in a row)."""
    ok = (layer and all(ch.isalnum() or ch in "_-." for ch in layer) and layer.lower() not in RESERVED
          and not layer.startswith(".") and ".." not in layer)
    if not ok:
        raise AtlasError(f"layer name '{layer}' cannot be a folder of the site")
    return layer


def _code_hash() -> str:
    h = hashlib.sha256()
    # the WebP encoder too (atlas/pictures/webp.py): what the site's pictures are made with
    for d, pat in ((TEMPLATES, "*"), (STATIC, "*"), (Path(__file__).parent, "*.py"), (PACKAGE / "pictures", "webp.py")):
        for f in sorted(d.glob(pat)):
            if f.is_file():
                h.update(f.name.encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:24]


def _atlas_files(a) -> list:
    """What the site depends on in the atlas folder: every file but the render cache (name, size, mtime)."""
    root = Path(a.path)
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if rel.parts[0] == "cache" or not p.is_file():
            continue
        st = p.stat()
        out.append((str(rel), st.st_size, st.st_mtime_ns))
    for pics in gather.linked_pictures(a).values():  # outside the atlas, but shown by the site
        for p in pics:
            st = p.stat()
            out.append((str(p), st.st_size, st.st_mtime_ns))
    return out


def _save_run(site: Site, state: dict, run: dict) -> None:
    from .site import write_record

    state = dict(state)
    state["last_run"] = run
    write_record(site.root / STATE, state)


def _fmt_s(v: Any) -> str | None:
    if v is None:
        return None
    v = float(v)
    return f"{v:.1f} s" if v < 120 else f"{int(v // 60)} min {int(v % 60):02d} s"


class _Exporter:
    def __init__(self, a, site: Site, pics: Pictures, selection: dict[str, list[int]], code: str, log):
        import jinja2

        self.a, self.site, self.pics, self.sel, self.code, self.log = a, site, pics, selection, code, log
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                                      undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.env.filters["sql_literal"] = gather.q  # a layer as the shared SQL templates take it (sql.js)
        self.env.filters["split_cards"] = _split_cards
        m = a.manifest
        self.model_name = m["model"]["name"]
        mdl = m["model"]
        self.weights_note = (f"random initialisation, seed {mdl.get('seed')}" if mdl.get("random_init")
                             else f"weights sha256 {str(mdl.get('weights_sha256'))[:12]}…")
        ds = m["dataset"]
        self.dataset_name = Path(str(ds.get("spec") or ds.get("root") or "dataset")).name or str(ds.get("spec"))
        self.errors: list[str] = []
        self.fv: dict[tuple[str, int], dict[str, Any]] = {}  # (layer, channel) -> its feature visualization
        self.incomplete = 0  # channels whose pictures lack an image: redrawn by a later export if it is back
        self.incomplete_images = 0  # image pages whose picture is unavailable: the same
        self.comparison = None  # a SiteComparison (export(compare=...)): the comparison section
        self.glance: dict[str, list[dict[str, Any]]] = {}  # layer -> its strongest exported channels' pictures
        # image_id -> the exported top-k entries it holds, with their pictures (for the image pages)
        self.held: dict[int, list[dict[str, Any]]] = {}
        self.panels = False  # ship each channel's panel as one picture too (export(panels=True))

    # -- helpers ------------------------------------------------------------------
    def common(self, root: str, json_href: str) -> dict[str, Any]:
        from ..store.manifest import random_weights

        return {"root": root, "json_href": json_href, "model_name": self.model_name,
                "weights_note": self.weights_note, "dataset_name": self.dataset_name,
                "random_weights": random_weights(self.a.manifest["model"]),
                "display_note": DISPLAY_NOTES[self.pics.display]}

    def page(self, rel: str, template: str, data: dict[str, Any], root: str) -> None:
        """Write rel (HTML) and its JSON twin from the same data; skipped when data and code are unchanged."""
        json_rel = rel[:-5] + ".json"
        json_href = Path(json_rel).name
        k = key_of(self.code, template, data, self.pics.display)
        self.site.write_json(json_rel, k, lambda: data)
        self.site.write_text(rel, k, lambda: self.env.get_template(template).render(
            **data, **self.common(root, json_href)))

    # -- the run ------------------------------------------------------------------
    def run(self, bar: Progress) -> None:
        summaries = {s["layer"]: s for s in gather.layer_summaries(self.a)}
        for layer, chans in self.sel.items():
            self.layer(layer, chans, summaries[layer], bar)
        self.images()
        filters = self.filters()
        analyses = self.analyses()
        compared = self.compared()
        self.static()
        self.index(summaries, filters, analyses, compared)

    def layer(self, layer: str, chans: list[int], summary: dict[str, Any], bar: Progress) -> None:
        a = self.a
        stats = gather.channel_stats(a, layer)
        by_c = {s["channel"]: s for s in stats}
        tops = gather.top_rows(a, layer)
        act = gather.activation_summary(a, layer, summary["channels"])
        order = sorted((s for s in stats if s["max"] is not None), key=lambda s: (-s["max"], s["channel"]))
        rank_by_max = {s["channel"]: i + 1 for i, s in enumerate(order)}
        exported = set(chans)
        slug = _slug(layer)
        side = _site_cell(summary, a.image_size)
        tiles_pics: dict[int, dict[str, Any]] = {}
        for i in range(0, len(chans), CHUNK):
            part = chans[i:i + CHUNK]
            # pictures: ask the renderer only for channels with a picture not already in the site
            want = {c: self._wanted(layer, slug, c, tops.get(c, [])) for c in part}
            need = [c for c in part if not all([self._there(w) for w in want[c]])]
            # the panel is drawn into the cache even when the site does not ship it: `atlas show`, which the
            # page names for it, then finds it drawn
            made = self.pics.channels(layer, need, tops) if need else {}
            self.fv.update({(layer, c): v for c, v in fvx.link(self, layer, part, slug, by_c).items()})
            for c in part:
                rows = tops.get(c, [])
                got = made.get(c)
                if got is not None:
                    srcs = [got.get("panel")] if self.panels else []
                    srcs += [p for pair in zip(got["proj"], got["patch"]) for p in pair]
                    for w, src in zip(want[c], srcs if rows else []):
                        if self._there(w) or src is None or not Path(src).is_file():
                            continue
                        kind, rel, k = w
                        web = self.pics.web(Path(src), side if kind == "proj" else None)
                        if kind == "patch":
                            self.site.link_shared(k, web, PATCHES)
                        else:
                            self.site.link(rel, k, web)
                    if got.get("error"):
                        self.errors.append(f"{layer}/{c}: {got['error']}")
                        self.incomplete += 1
                placed = {w[2]: self._placed(w) for w in want[c]}
                if got is not None and got.get("error"):
                    self._stale(want[c])
                top = []
                ranks = [w for w in want[c] if w[0] != "panel"]
                for r, proj, patch in zip(rows, ranks[0::2], ranks[1::2]):
                    pr, pa = placed[proj[2]], placed[patch[2]]
                    # relative to the layer's folder: a projection in its img/, a patch in the site's shared one
                    t = {**r, "proj": pr[len(slug) + 1:] if pr else None, "patch": f"../{pa}" if pa else None,
                         "image_href": _image_href(r["image_id"])}
                    top.append(t)
                    self.held.setdefault(r["image_id"], []).append(
                        {"layer": layer, "channel": c, "rank": r["rank"], "value": r["value"],
                         "href": f"../{slug}/{c}.html",
                         "proj": f"../{slug}/{t['proj']}" if t["proj"] else None,
                         "patch": t["patch"],  # an image page is one folder down too
                         "whole": bool(t["patch"]) and _whole_image(r, summary, self.a.image_size)})
                panel = next((placed[k][len(slug) + 1:] for kind, _, k in want[c] if kind == "panel" and placed[k]),
                             None)
                tiles_pics[c] = {"proj": top[0]["proj"] if top else None, "patch": top[0]["patch"] if top else None,
                                 "image_href": top[0]["image_href"] if top else None}
                self.channel(layer, c, chans, by_c[c], rank_by_max, len(stats), top, panel, act, exported,
                             got.get("error") if got else None)
                bar.update(1)
        # the layer page: the exported channels only (a page of 512 tiles for 10 exported ones was mostly
        # placeholders), each tile showing, and filtered by, the most frequent label of its top-k
        tiles = []
        for c in chans:
            s = by_c[c]
            rows = tops.get(c, [])
            mix = gather.label_mix(rows)
            p = tiles_pics.get(c, {})
            tiles.append({**s, "href": f"{c}.html", "proj": p.get("proj"), "patch": p.get("patch"),
                          "image_href": p.get("image_href"),
                          "featurevis": (self.fv.get((layer, c)) or {}).get("src"),
                          "top_label": mix[0]["label"] if mix else None,
                          "top_label_n": mix[0]["n"] if mix else 0, "k": len(rows)})
        labels = sorted({t["top_label"] for t in tiles if t["top_label"] is not None})
        more = None
        if len(chans) < summary["channels"]:
            # a site is what the last export asked: the command names every layer of this one, so that
            # exporting more of this layer keeps the others
            more = {"command": f"atlas export ATLAS SITE --layers {','.join(self.sel)}",
                    "layers": list(self.sel)}
        data = {"layer": summary, "tiles": tiles, "labels": labels, "exported": len(exported), "more": more}
        self.page(f"{slug}/index.html", "layer.html", data, "../")
        self.glance[layer] = [
            {"channel": t["channel"], "max": t["max"], "href": f"{slug}/{t['href']}",
             "proj": f"{slug}/{t['proj']}" if t["proj"] else None,
             "patch": t["patch"][len("../"):] if t["patch"] else None}
            for t in sorted((t for t in tiles if t["max"] is not None and (t["proj"] or t["patch"])),
                            key=lambda t: (-t["max"], t["channel"]))[:GLANCE]]

    def _wanted(self, layer: str, slug: str, c: int, rows: list[dict[str, Any]]) -> list[tuple[str, str | None, str]]:
        """A channel's pictures as (kind, site path, key of their inputs): its panel (with --panels), then each rank's
        projection and patch. A patch has no path of its own: it is shared (PATCHES), found by its key."""
        pk = self.pics.key
        if not rows:
            return []
        out = [("panel", f"{slug}/img/{c}-panel.webp", key_of(pk, layer, c, "panel", rows))] if self.panels else []
        for r in rows:
            rk = key_of(pk, layer, c, r)
            out += [("proj", f"{slug}/img/{c}-{r['rank']}.webp", rk), ("patch", None, rk + "p")]
        return out

    def _there(self, w: tuple[str, str | None, str]) -> bool:
        """Whether a wanted picture is in the site from these inputs (and is kept)."""
        kind, rel, k = w
        if kind == "patch":
            return self.site.shared(k) is not None
        return rel in self.site.files and self.site.files[rel] == k or self.site.fresh(rel, k)

    def _placed(self, w: tuple[str, str | None, str]) -> str | None:
        """Where a wanted picture is in the site (relative to its root), or None."""
        kind, rel, k = w
        if kind == "patch":
            return self.site.aliases.get(k)
        return rel if self.site.files.get(rel) == k else None

    def _stale(self, wanted: list[tuple[str, str | None, str]]) -> None:
        """A channel drawn with an image missing: its pictures stay in the site, recorded so that the next
        export draws them again (the image may be back) rather than keeping them as fresh."""
        for kind, rel, k in wanted:
            if kind == "patch":
                self.site.aliases.pop(k, None)
            elif rel in self.site.files:
                self.site.files[rel] = "incomplete"

    def channel(self, layer, c, chans, stats, rank_by_max, n, top, panel, act, exported, error) -> None:
        j = chans.index(c)
        prev = {"channel": chans[j - 1], "href": f"{chans[j - 1]}.html"} if j > 0 else None
        nxt = {"channel": chans[j + 1], "href": f"{chans[j + 1]}.html"} if j + 1 < len(chans) else None
        similar = []
        hist = None
        if act is not None:
            hist = act["hist"].get(c)
            similar = [{**s, "href": f"{s['channel']}.html" if s["channel"] in exported else None}
                       for s in act["similar"].get(c, [])]
        data = {
            "layer": layer, "channel": c,
            "stats": {**stats, "rank_by_max": rank_by_max.get(c), "of": n},
            "top": top, "panel": panel, "error": error, "featurevis": self.fv.get((layer, c)),
            "label_mix": gather.label_mix(top),
            "histogram": hist, "similar": similar,
            "sql": gather.sql_for_channel(layer, c),
            "prev": prev, "next": nxt, "up": "index.html",
        }
        if self.comparison is not None:  # the key only then: pages of sites without one stay as they were
            data["counterpart"] = self.comparison.counterpart(layer, c)
        self.page(f"{_slug(layer)}/{c}.html", "channel.html", data, "../")

    def images(self) -> None:
        """A page per image in an exported channel's top-k: the image as the net saw it, its strongest channels
        per layer (the per-image maxima of the activations table; a layer without one lists the top-k
        entries the image holds there), and the exported top-k entries it holds, with their pictures (the
        channel pages' own files)."""
        ids = sorted(self.held)
        if not ids:
            return
        rows = gather.images_of(self.a, ids)
        order = {n: i for i, n in enumerate(self.a.layer_names)}
        strongest: dict[str, dict[int, list] | None] = {}
        for layer in self.a.layer_names:
            got = gather.strongest_channels(self.a, layer, ids)
            if got is not None or layer in self.sel:
                strongest[layer] = got
        exported = {layer: set(chans) for layer, chans in self.sel.items()}
        pk = self.pics.key
        for j, i in enumerate(ids):
            row = rows.get(i, {"image_id": i, "path": None, "label": None})
            held = sorted(self.held[i], key=lambda h: (order.get(h["layer"], 0), -(h["value"] or 0), h["channel"]))
            # the image: a patch of it already in the site when one is the whole image (a deep layer's),
            # else its own picture
            whole = next((h for h in held if h["whole"]), None)
            picture = whole["patch"] if whole else None
            rel, k = f"images/img/{i}.webp", key_of(pk, "image", i, row["path"])
            if picture is not None:
                pass
            elif self.site.fresh(rel, k):
                picture = f"img/{i}.webp"
            else:
                src = self.pics.image(i)
                if src is not None and Path(src).is_file():
                    self.site.link(rel, k, self.pics.web(Path(src)))
                    picture = f"img/{i}.webp"
                else:  # counted, so that a later export draws it once the image is back
                    self.incomplete_images += 1
                    self.errors.append(f"image {i}: unavailable, its page shows no picture")
            ranks = {(h["layer"], h["channel"]): h["rank"] for h in held}
            layers = []
            for layer, got in strongest.items():
                # a layer left out of this export may have a name no site folder can take: never asked for
                slug = _slug(layer) if layer in self.sel else None
                if got is not None:
                    chans, source = got.get(i, []), "activations"
                else:  # no activations table: the top-k entries of this layer the image holds
                    chans = [{"channel": h["channel"], "value": h["value"]} for h in held if h["layer"] == layer]
                    source = "top_activations"
                layers.append({"layer": layer, "source": source,
                               "href": f"../{slug}/index.html" if layer in self.sel else None,
                               "channels": [{**c, "href": f"../{slug}/{c['channel']}.html"
                                             if c["channel"] in exported.get(layer, ()) else None,
                                             "rank": ranks.get((layer, c["channel"]))} for c in chans]})
            data = {"image": row, "picture": picture, "size": self.a.image_size, "layers": layers,
                    "picture_from": {k_: whole[k_] for k_ in ("layer", "channel", "rank", "href")} if whole else None,
                    "held": held, "cards": CARDS, "sql": gather.sql_for_image(i), "n": gather.STRONGEST,
                    "prev": {"image_id": ids[j - 1], "href": f"{ids[j - 1]}.html"} if j > 0 else None,
                    "next": {"image_id": ids[j + 1], "href": f"{ids[j + 1]}.html"} if j + 1 < len(ids) else None}
            self.page(f"images/{i}.html", "image.html", data, "../")

    def filters(self) -> dict[str, Any] | None:
        lm_layers = [la for la in self.a.manifest["layers"] if la.get("kind", "conv") == "conv"]
        if not lm_layers:
            return None
        first = lm_layers[0]
        if first.get("pools_below"):
            return None
        rel = f"img/{_slug(first['layer'])}-filters.png"
        k = key_of(self.pics.key, "filters", first["layer"])
        if not self.site.fresh(rel, k):
            src = self.pics.filter_grid(first["layer"])
            if src is None or not Path(src).is_file():
                return None
            self.site.link(rel, k, Path(src))
        return {"layer": first["layer"], "channels": first["channels"], "src": rel}

    def analyses(self) -> list[dict[str, Any]]:
        out = []
        for an in gather.analyses(self.a):
            name = an["name"]
            slug = name if all(ch.isalnum() or ch in "_-" for ch in name) else "a-" + key_of(name)[:10]
            runs: dict[str, list] = {}
            for i, p in enumerate(an["pictures"]):
                rel = f"analyses/{slug}/{i}{p.suffix.lower()}"
                st = p.stat()
                self.site.link(rel, key_of(str(p), st.st_size, st.st_mtime_ns), p)
                if p in an["linked"]:  # a picture of the linked training run: its own group, shown first
                    run, sub = an["linked"][p], Path(p.name)
                else:
                    sub = p.relative_to(an["dir"])
                    run = str(sub.parent) if sub.parent != Path(".") else ""
                runs.setdefault(run, []).append({"name": sub.name, "src": f"{slug}/{i}{p.suffix.lower()}",
                                                 "main": p.stem == "figure" or p in an["linked"]})
            for pics in runs.values():
                # a run's figure.png sets its other pictures side by side: shown once, they are linked after it
                composite = any(q["main"] and q["name"] == "figure.png" for q in pics)
                for q in pics:
                    q["part"] = composite and not q["main"]
            runs_list = [{"name": k, "pictures": v} for k, v in runs.items()]
            table, measured = None, []
            if an["view"]:
                try:
                    cols, rows, total = gather.analysis_rows(self.a, an["view"])
                    table = {"view": an["view"], "columns": cols, "rows": rows, "total": total}
                    measured = gather.analysis_runs(self.a, an["view"])
                except Exception as e:  # noqa: BLE001 - a broken analysis table must not stop the export
                    self.errors.append(f"analysis {name}: {e}")
            data = {"name": name, "title": an["title"], "about": an["about"], "runs": runs_list, "table": table,
                    "measured": measured}
            self.page(f"analyses/{slug}.html", "analysis.html", data, "../")
            # the index's line: what the runs measured, in their own words (one run), or how many there are
            brief = (measured[0]["measured"] if len(measured) == 1 else
                     f"{len(measured)} runs" if measured else None)
            out.append({"name": name, "title": an["title"], "about": an["about"], "view": an["view"],
                        "href": f"analyses/{slug}.html", "brief": brief})
        return out

    def compared(self) -> dict[str, Any] | None:
        """The comparison page, when the export has one: its chart linked into img/, then the page."""
        if self.comparison is None:
            return None
        from .comparison import PAGE

        data = self.comparison.page(self.sel)
        chart = self.comparison.cmp.path / "quality.png"
        st = chart.stat()
        self.site.link(data["quality"], key_of(str(chart), st.st_size, st.st_mtime_ns), chart)
        self.page(PAGE, "compare.html", data, "")
        return {"href": PAGE, "other": data["other"], "pairs": len(data["pairs"])}

    def static(self) -> None:
        for f in sorted(STATIC.iterdir()):
            if f.is_file():
                text = f.read_text(encoding="utf-8")
                self.site.write_text(f"static/{f.name}", key_of(text), lambda t=text: t)
        # the channel and image pages' SQL, once for all of them (gather.sql_templates; atlas.js fills it in)
        text = ("// Written by `atlas export`: the SQL of the channel and image pages, {L} a layer's SQL literal\n"
                "// and {C} the page's number (atlas.js writes it into each page's SQL section).\n"
                f"window.ATLAS_SQL = {json.dumps(gather.sql_templates(), indent=1, ensure_ascii=False)};\n")
        self.site.write_text(SQL_JS, key_of(text), lambda: text)

    def index(self, summaries, filters, analyses, compared=None) -> None:
        m = self.a.manifest
        mdl, ds, t = m["model"], m["dataset"], m.get("timings", {})
        layers = []
        for name, s in summaries.items():
            layers.append({**s, "href": f"{_slug(name)}/index.html" if name in self.sel else None,
                           "exported": len(self.sel.get(name, [])), "glance": self.glance.get(name, [])})
        timings = [(label, v) for label, v in (
            ("mining", _fmt_s(t.get("mining_s"))), ("switches", _fmt_s(t.get("switches_s"))),
            ("writing", _fmt_s(t.get("write_s"))), ("total", _fmt_s(t.get("total_s"))),
            ("throughput", f"{t['images_per_s']} images/s" if t.get("images_per_s") else None)) if v]
        data = {
            "model": mdl["name"],
            "weights": {"random_init": bool(mdl.get("random_init")), "seed": mdl.get("seed"),
                        "file": Path(mdl["weights"]).name if mdl.get("weights") else None,
                        "sha256": mdl.get("weights_sha256")},
            "dataset": {"name": self.dataset_name, "kind": ds.get("kind"), "count": ds.get("count"),
                        "ok": ds.get("ok"), "errors": ds.get("errors"), "classes": ds.get("classes")},
            "unreadable": gather.unreadable_images(self.a),
            "preprocessing": m["preprocessing"].get("note", ""),
            "k": m["k"],
            "built": {"created": m.get("created"), "version": m.get("tool", {}).get("version"),
                      "torch": m.get("tool", {}).get("torch"), "device": m.get("options", {}).get("device")},
            "timings": timings,
            "layers": layers,
            "filters": filters,
            "analyses": analyses,
        }
        if compared is not None:
            data["compared"] = compared
        self.page("index.html", "index.html", data, "")
