"""Feature evolution during training (the paper's figure 4): how the strongest activation of chosen
channels, projected to pixels, changes from snapshot to snapshot of one training run.

For each snapshot s (RUN_DIR/snapshots/epoch-XXX.pt, and final.pt when it is later than every
snapshot) the snapshot's model runs over every image of the data (the run's training data unless
told otherwise; the snapshot's own preprocessing: centre crop, eval mode) and, for each channel of
the chosen layers, the strongest activation -- the spatial and image maximum, ties to the first
image and position -- is kept. Every channel's maximum at every snapshot goes to the table
(beside the PNG, its name with .parquet: epoch, snapshot, layer, channel, image_id, image_path, value, y,
x, shown). For the shown channels the activation is projected to pixels with the DeconvNet engine
(atlas.deconv.project_images, unit mode, contrast normalisation as identity) and the projection
inside the unit's receptive field is drawn: one row per channel, one column per snapshot.

Display: atlas.pictures.drawing's normalisation -- each cell is scaled by its own max |value| around
mid-grey (grey = 0, v / (2 max|v|) + 0.5), then resized to the cell; a channel whose maximum is
<= 0 (dead at that snapshot) is drawn as a flat grey cell marked "dead". The geometry of the grid
is stored in the PNG's text chunk "atlas-grid" (JSON), so that a reader (`read_grid`) finds each
cell without guessing.

The images are decoded once for all snapshots when they fit in memory (`_Images`), since every
snapshot searches the same images.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import torch

from ..data import DecodedImages, Preprocess, open_dataset
from ..errors import AtlasError
from ..util.files import atomic_write, atomic_write_parquet
from ..net import LayerMap
from ..models.registry import load_model, read_weights, trainable_names
from ..util.progress import Progress
from . import font, wrap_text

MEMORY_LIMIT = 2 << 30
_SNAP = re.compile(r"^epoch-(\d+)\.pt$")


# ---------------------------------------------------------------------------
# the run's snapshots
# ---------------------------------------------------------------------------
def find_snapshots(run_dir: str | os.PathLike) -> tuple[Path, list[tuple[int, str, Path]]]:
    """(run folder, [(epoch, label, weights path)]) in epoch order: the snapshots, plus final.pt
    when its epoch is later than every snapshot's."""
    p = Path(run_dir)
    run = p.parent if p.is_file() else p
    if not run.is_dir():
        raise AtlasError(f"training run '{run_dir}' does not exist")
    snaps: list[tuple[int, str, Path]] = []
    sdir = run / "snapshots"
    if sdir.is_dir():
        for f in sorted(sdir.iterdir()):
            m = _SNAP.match(f.name)
            if m:
                snaps.append((int(m.group(1)), f"epoch {int(m.group(1))}", f))
    final = run / "final.pt"
    if final.is_file():
        _, meta = read_weights(final)
        fe = int(meta.get("epochs", -1))
        if not snaps or fe > snaps[-1][0]:
            snaps.append((fe, f"epoch {fe} (final)" if fe >= 0 else "final", final))
    if not snaps:
        raise AtlasError(f"training run '{run}' has no snapshots and no final.pt: train it with "
                         "--snapshot-epochs 1,2,5,...")
    return run, sorted(snaps, key=lambda s: s[0])


def _run_data(run: Path) -> str | None:
    cfg = run / "config.json"
    if cfg.is_file():
        c = json.loads(cfg.read_text())
        return c.get("data_root") or c.get("data")
    return None


# ---------------------------------------------------------------------------
# the images
# ---------------------------------------------------------------------------
class _Images:
    """The dataset's images, preprocessed by a model's own preprocessing: decoded once when they
    fit in memory (uint8 centre crops), else decoded again for each snapshot."""

    def __init__(self, source, ids: list[int], pre: dict[str, Any], batch_size: int, workers: int,
                 progress, memory_limit: int = MEMORY_LIMIT):
        self.source, self.ids, self.pre = source, ids, Preprocess(pre)
        self.batch_size, self.workers = batch_size, workers
        c = self.pre.crop
        self.u8 = None
        if len(ids) * 3 * c * c <= memory_limit:
            from ..train import decode_squares

            sq, _ = decode_squares(source, ids, self.pre.resize, workers, progress, "decode")
            o = (self.pre.resize - c) // 2
            self.u8 = sq[:, :, o:o + c, o:o + c].contiguous()

    def normalize(self, u8: torch.Tensor) -> torch.Tensor:
        return (u8.float() / 255.0 - self.pre.mean) / self.pre.std

    def batches(self):
        """Yield (normalised float batch, positions) in dataset order."""
        n = len(self.ids)
        if self.u8 is not None:
            for s in range(0, n, self.batch_size):
                yield self.normalize(self.u8[s:s + self.batch_size]), torch.arange(s, min(s + self.batch_size, n))
            return
        ds = DecodedImages(self.source, self.pre, self.ids)
        loader = torch.utils.data.DataLoader(ds, batch_size=self.batch_size, num_workers=self.workers)
        s = 0
        for x, _, _, _ in loader:
            yield x, torch.arange(s, s + len(x))
            s += len(x)

    def get(self, positions: Sequence[int]) -> torch.Tensor:
        if self.u8 is not None:
            return self.normalize(self.u8[list(positions)])
        return torch.stack([self.pre(self.source.open_image(self.ids[p])) for p in positions])


def strongest(lmap: LayerMap, images: _Images, layers: list[str], dev: torch.device,
              bar: Progress | None = None, keep: dict[str, list] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """For each layer: per channel the largest activation over all images and positions.

    Returns {layer: {"value", "image" (position in images.ids), "y", "x"}} (CPU tensors, one per
    channel). Ties go to the first image, then the first position (row-major). `keep`: each batch's
    per-image maxima (images x channels, numpy) are appended to keep[layer], for matching snapshots."""
    best: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for x, pos in images.batches():
            acts = lmap.extract(x.to(dev), layers)
            for name in layers:
                a = acts[name].float()
                b, c, h, w = a.shape
                flat = a.reshape(b, c, h * w)
                v, where = flat.max(dim=2)            # first position on ties
                if keep is not None:
                    keep.setdefault(name, []).append(v.cpu().numpy())
                bv, bi = v.max(dim=0)                  # first image on ties
                loc = where.gather(0, bi[None]).squeeze(0)
                cur = best.get(name)
                img = pos.to(bi.device)[bi]
                new = {"value": bv, "image": img, "y": loc // w, "x": loc % w}
                if cur is None:
                    best[name] = new
                else:
                    better = new["value"] > cur["value"]  # strictly: earlier images win ties
                    for k in new:
                        cur[k] = torch.where(better, new[k], cur[k])
            if bar is not None:
                bar.update(len(x))
    return {n: {k: v.cpu() for k, v in d.items()} for n, d in best.items()}


# ---------------------------------------------------------------------------
# the grid
# ---------------------------------------------------------------------------
def grid_geometry(rows: int, cols: int, cell: int, label_w: int = 120, header_h: int = 44,
                  value_h: int = 16, gap: int = 6, footer_h: int = 28, min_width: int = 0,
                  min_pitch_x: int = 0) -> dict[str, Any]:
    """Where each cell goes: cell (r, c) has its top-left corner at
    (x0 + c * pitch_x, y0 + r * pitch_y) and is `cell` x `cell` pixels."""
    pitch_x, pitch_y = max(cell + gap, min_pitch_x), cell + value_h + gap
    width = max(label_w + cols * pitch_x + gap, min_width)
    height = header_h + rows * pitch_y + footer_h
    return {"rows": rows, "cols": cols, "cell": cell, "x0": label_w, "y0": header_h,
            "pitch_x": pitch_x, "pitch_y": pitch_y, "width": width, "height": height, "footer_h": footer_h}


def _fit(arr: np.ndarray, cell: int):
    """A (h, w, 3) uint8 projection centred in a cell x cell tile (aspect kept)."""
    from PIL import Image

    im = Image.fromarray(arr)
    h, w = arr.shape[:2]
    s = cell / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    im = im.resize(size, Image.NEAREST if s >= 1 else Image.BILINEAR)
    tile = Image.new("RGB", (cell, cell), (128, 128, 128))
    tile.paste(im, ((cell - size[0]) // 2, (cell - size[1]) // 2))
    return tile


def draw_grid(cells: list[list[dict[str, Any]]], row_labels: list[str], col_labels: list[str], cell: int,
              title: str, footer: str, path: Path) -> Path:
    """cells[r][c] = {"image": (h, w, 3) uint8 or None, "text": str}. Title and footer are wrapped to
    the width of the grid (at least 420 px)."""
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    rows, cols = len(row_labels), len(col_labels)
    f, fs, ft = font(13), font(11), font(14)
    label_w = max(90, int(max((f.getlength(t) for t in row_labels), default=0)) + 16)
    cf = fs if cell < 70 else f
    # columns at least as wide as their labels: "epoch 12 (final)" is wider than a small cell
    pitch = int(max((cf.getlength(t) for t in col_labels), default=0)) + 8
    base = grid_geometry(rows, cols, cell, label_w=label_w, min_width=420, min_pitch_x=pitch)
    tlines = wrap_text(title, ft, base["width"] - 12)
    flines = wrap_text(footer, fs, base["width"] - 12)
    g = grid_geometry(rows, cols, cell, label_w=label_w, header_h=30 + 17 * len(tlines),
                      footer_h=10 + 14 * len(flines), min_width=420,
                      min_pitch_x=pitch)
    img = Image.new("RGB", (g["width"], g["height"]), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for i, line in enumerate(tlines):
        d.text((6, 6 + 17 * i), line, fill=(0, 0, 0), font=ft)
    for c, lab in enumerate(col_labels):
        cx = g["x0"] + c * g["pitch_x"] + cell // 2
        d.text((cx, g["y0"] - 6), lab, fill=(0, 0, 0), font=cf, anchor="mb")
    for r, lab in enumerate(row_labels):
        cy = g["y0"] + r * g["pitch_y"] + cell // 2
        d.text((g["x0"] - 8, cy), lab, fill=(0, 0, 0), font=f, anchor="rm")
        for c in range(cols):
            x, y = g["x0"] + c * g["pitch_x"], g["y0"] + r * g["pitch_y"]
            item = cells[r][c]
            if item.get("image") is not None:
                img.paste(_fit(item["image"], cell), (x, y))
            else:
                d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(128, 128, 128))
            d.rectangle([x - 1, y - 1, x + cell, y + cell], outline=(200, 200, 200))
            if item.get("text"):
                d.text((x + cell // 2, y + cell + 2), item["text"], fill=(60, 60, 60), font=fs, anchor="mt")
    for i, line in enumerate(flines):
        d.text((6, g["height"] - g["footer_h"] + 4 + 14 * i), line, fill=(90, 90, 90), font=fs)
    info = PngInfo()
    info.add_text("atlas-grid", json.dumps({**g, "row_labels": row_labels, "col_labels": col_labels}))
    from ..pictures.drawing import NORMALISATION

    info.add_text("atlas.normalisation", NORMALISATION)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG", pnginfo=info))


def read_grid(path: str | os.PathLike) -> dict[str, Any]:
    """The grid geometry stored in a PNG written by this module."""
    from PIL import Image

    with Image.open(path) as im:
        return json.loads(im.text["atlas-grid"])


# ---------------------------------------------------------------------------
# the analysis
# ---------------------------------------------------------------------------
def _choose(best: dict[str, dict[str, torch.Tensor]], lmap: LayerMap, layers: list[str],
            channels: Iterable[int] | dict[str, Iterable[int]] | None, per_layer: int, select: str
            ) -> list[tuple[str, int]]:
    out = []
    for name in layers:
        n = lmap.by_name[name].channels
        if isinstance(channels, dict):
            chosen = [int(c) for c in channels.get(name, [])]
        elif channels is not None:
            chosen = [int(c) for c in channels]
        elif select == "first":
            chosen = list(range(min(per_layer, n)))
        else:
            v = best[name]["value"]
            order = sorted(range(n), key=lambda c: (-float(v[c]), c))
            chosen = sorted(order[:min(per_layer, n)])
        bad = [c for c in chosen if not 0 <= c < n]
        if bad:
            raise AtlasError(f"{name} has channels 0..{n - 1}, not {', '.join(map(str, bad))}")
        out += [(name, c) for c in chosen]
    return out


def _parse_channels(channels):
    if not isinstance(channels, str):
        return channels
    try:
        return [int(c) for c in channels.split(",") if c.strip()]
    except ValueError:
        raise AtlasError(f"--channels must be channel numbers like 0,5,9 (got '{channels}')") from None


def _chosen_snapshots(run_dir, epochs) -> tuple[Path, list[tuple[int, str, Path]]]:
    """The run folder and its snapshots, only the `epochs` asked for when given."""
    from ..train import parse_epochs

    run, snaps = find_snapshots(run_dir)
    if epochs is None or epochs == "":
        return run, snaps
    want = parse_epochs(epochs)
    missing = [e for e in want if e not in {s[0] for s in snaps}]
    if missing:
        raise AtlasError(f"training run '{run}' has no snapshot of epoch {', '.join(map(str, missing))} "
                         f"(it has {', '.join(str(s[0]) for s in snaps)})")
    return run, [s for s in snaps if s[0] in want]


def _model_of(weights: Path) -> tuple[str, Any]:
    """(model name, preprocessing) that `atlas train` recorded in a snapshot."""
    _, meta = read_weights(weights)
    name = meta.get("model")
    if not name:
        raise AtlasError(f"weights '{weights}' do not say which model they are for (no meta.model): "
                         "evolution needs the snapshots written by `atlas train`")
    if name not in trainable_names():  # a name in a file is never a path to code to run
        raise AtlasError(f"weights '{weights}' are for model '{name}', which `atlas train` does not train: "
                         "evolution needs the snapshots written by `atlas train`")
    return name, meta.get("preprocessing")


def _search_snapshots(name: str, pre, snaps, source, ids: list[int], layers, dev: torch.device, batch_size: int,
                      workers: int, progress: bool | None, follow: bool = False):
    """One pass over the images per snapshot: every channel's strongest activation.

    Returns (per snapshot the `strongest` result, the images, the last snapshot's LayerMap, the
    chosen conv layers, and with `follow` the matches of each step between snapshots: atlas.compare.
    snapshots; only two snapshots' per-image maxima are held at a time)."""
    from ..compare.snapshots import match_snapshots

    bests, steps, previous = [], [], None
    lmap = chosen_layers = None
    with Progress(len(ids) * len(snaps), "evolution", "images", enabled=progress) as bar:
        images = None
        for _, _, path in snaps:
            net = load_model(name, weights=path).to(dev)
            spre = net.atlas_meta.get("preprocessing") or pre
            if images is None:
                images = _Images(source, ids, spre, batch_size, workers, progress)
            lmap = LayerMap(net, images.pre.crop)
            chosen_layers = [la.name for la in lmap.resolve(layers, kinds=("conv",))]
            bad = [la for la in chosen_layers if lmap.by_name[la].kind != "conv"]
            if bad:
                raise AtlasError(f"evolution shows conv layers; '{bad[0]}' is not one")
            kept: dict[str, list] | None = {} if follow else None
            bests.append(strongest(lmap, images, chosen_layers, dev, bar, kept))
            if kept is not None:
                current = {la: np.concatenate(v) for la, v in kept.items()}
                if previous is not None:
                    steps.append(match_snapshots(previous, current))
                previous = current
            del net
    return bests, images, lmap, chosen_layers, steps


def _write_table(path: Path, snaps, bests, layers: list[str], ids: list[int], source,
                 shown: list[list[tuple[str, int | None]]]) -> None:
    """The table: every channel's strongest activation at every snapshot; `shown`: per snapshot, the unit of
    each row of the grid (row: its row, null for channels not shown)."""
    cols: dict[str, list] = {k: [] for k in ("epoch", "snapshot", "layer", "channel", "image_id", "image_path",
                                              "value", "y", "x", "shown", "row")}
    for (epoch, _, snap), best, units in zip(snaps, bests, shown):
        rows = {u: r for r, u in enumerate(units) if u[1] is not None}
        for la in layers:
            b = best[la]
            for c in range(len(b["value"])):
                img = int(b["image"][c])
                cols["epoch"].append(epoch)
                cols["snapshot"].append(snap.name)
                cols["layer"].append(la)
                cols["channel"].append(c)
                cols["image_id"].append(ids[img])
                cols["image_path"].append(source.records[ids[img]].path)
                cols["value"].append(float(b["value"][c]))
                cols["y"].append(int(b["y"][c]))
                cols["x"].append(int(b["x"][c]))
                cols["shown"].append((la, c) in rows)
                cols["row"].append(rows.get((la, c)))
    types = {"epoch": pa.int32(), "snapshot": pa.string(), "layer": pa.string(), "channel": pa.int32(),
             "image_id": pa.int64(), "image_path": pa.string(), "value": pa.float32(), "y": pa.int32(),
             "x": pa.int32(), "shown": pa.bool_(), "row": pa.int32()}
    atomic_write_parquet(path, pa.table({k: pa.array(v, types[k]) for k, v in cols.items()}))


def _snapshot_column(name: str, weights: Path, best, shown: list[tuple[str, int | None]], images: _Images,
                     dev: torch.device, numbered: bool = False) -> list[dict[str, Any]]:
    """One snapshot's cells of the grid, a row per shown channel: its activation's projection, "dead"
    when its maximum is <= 0, or "no match" for a followed unit a step left without one (channel None).
    `numbered`: the cell says its channel too (followed units change numbers)."""
    from ..deconv import project_images
    from ..pictures.drawing import normalise

    cells = []
    for la, c in shown:
        if c is None:
            cells.append({"image": None, "text": "no match"})
            continue
        v = float(best[la]["value"][c])
        text = "dead" if v <= 0 else f"{v:.3g}"
        cells.append({"image": None, "text": f"c{c} {text}" if numbered else text})
    live = [(r, la, c) for r, (la, c) in enumerate(shown) if c is not None and float(best[la]["value"][c]) > 0]
    if not live:
        return cells
    positions = sorted({int(best[la]["image"][c]) for _, la, c in live})
    where = {p: i for i, p in enumerate(positions)}
    x = images.get(positions).to(dev)
    lmap = LayerMap(load_model(name, weights=weights).to(dev), images.pre.crop)
    reqs = [{"image": where[int(best[la]["image"][c])], "layer": la, "channel": c,
             "y": int(best[la]["y"][c]), "x": int(best[la]["x"][c])} for _, la, c in live]
    proj = project_images(lmap, x, reqs)
    for i, (r, _, _) in enumerate(live):
        cells[r]["image"] = normalise(proj.crop(i))
    return cells


def evolution(run_dir: str | os.PathLike, data: str | os.PathLike | None = None, *,
              layers: str | Sequence[str] | None = None,
              channels: str | Iterable[int] | dict[str, Iterable[int]] | None = None, per_layer: int = 4,
              select: str = "strongest", epochs: str | Iterable[int] | None = None,
              out: str | os.PathLike | None = None, cell: int = 64, max_images: int | None = None,
              batch_size: int = 64, device: str = "auto", workers: int | None = None,
              progress: bool | None = None, log: Callable[[str], None] | None = None,
              follow: str = "channel") -> Path:
    """Figure 4 for a training run: returns the PNG's path (the table is written beside it).

    follow: "channel" shows channel i at every snapshot; "matched" follows each unit shown at the last
    snapshot back through the one-to-one matches of consecutive snapshots (atlas.compare.snapshots), writes
    every step's matches beside the PNG (.matches.parquet) and says how well each step matched."""
    from ..util.device import default_workers, resolve_device

    log = log or (lambda s: None)
    if select not in ("strongest", "first"):
        raise AtlasError(f"--select must be strongest or first (got '{select}')")
    if per_layer < 1:
        raise AtlasError(f"--per-layer must be at least 1 (got {per_layer})")
    if cell < 16:
        raise AtlasError(f"--cell must be at least 16 pixels (got {cell})")
    if follow not in ("channel", "matched"):
        raise AtlasError(f"--follow must be channel or matched (got '{follow}')")
    channels = _parse_channels(channels)
    run, snaps = _chosen_snapshots(run_dir, epochs)
    name, pre = _model_of(snaps[-1][2])
    data = data if data is not None else _run_data(run)
    if data is None:
        raise AtlasError(f"training run '{run}' has no config.json naming its data: pass --data")
    source = open_dataset(data)
    ids = list(range(len(source) if max_images is None else min(len(source), int(max_images))))
    dev = resolve_device(device)
    nworkers = workers if workers is not None else default_workers(dev)
    out = Path(out) if out is not None else run / "evolution.png"
    table_path = out.with_suffix(".parquet")
    bests, images, lmap, chosen_layers, steps = _search_snapshots(name, pre, snaps, source, ids, layers, dev,
                                                                  batch_size, nworkers, progress,
                                                                  follow == "matched")
    shown = _choose(bests[-1], lmap, chosen_layers, channels, per_layer, select)
    per_snapshot = [shown] * len(snaps)
    footer = ("DeconvNet projection inside the unit's receptive field; each cell scaled by its own max |value|, "
              "grey = 0. Number: the activation.")
    if follow == "matched":
        from ..compare.snapshots import follow_back, steps_table

        per_snapshot = follow_back(shown, steps)
        atomic_write_parquet(out.with_suffix(".matches.parquet"), steps_table([s[0] for s in snaps], steps))
        said = []
        for (ea, _, _), (eb, _, _), step in zip(snaps, snaps[1:], steps):
            q = ", ".join(f"{la} {_mean(step.quality(la))}" for la in chosen_layers)
            said.append(f"epoch {ea}->{eb}: {q}")
            log(f"matched units, epoch {ea} -> {eb}: mean one-to-one correlation {q}")
        footer = (f"Units followed back from the last snapshot by one-to-one matches of consecutive snapshots "
                  f"(cN: the unit's channel then). Mean matched correlation per step: {'; '.join(said)}. " + footer)
    _write_table(table_path, snaps, bests, chosen_layers, ids, source, per_snapshot)
    columns = [_snapshot_column(name, path, best, units, images, dev, follow == "matched")
               for (_, _, path), best, units in zip(snaps, bests, per_snapshot)]
    grid = [[column[r] for column in columns] for r in range(len(shown))]
    title = (f"{name}: strongest activation over {len(ids)} images of {Path(str(data)).name}, "
             f"projected to pixels, at each snapshot")
    draw_grid(grid, [f"{la} ch {c}" for la, c in shown], [label for _, label, _ in snaps], cell, title, footer, out)
    log(f"evolution of {len(shown)} channels over {len(snaps)} snapshots: {out} (table: {table_path})")
    return out


def _mean(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def evolution_table(png: str | os.PathLike) -> list[dict[str, Any]]:
    """The shown channels' strongest activation at each snapshot, read from the table beside `png`:
    one dict per row of the grid (layer, channel at the last snapshot, then one "epoch N" key per snapshot,
    in epoch order; for units followed by their matches, whose channel changes, "channel N" keys too)."""
    import pyarrow.parquet as pq

    path = Path(png).with_suffix(".parquet")
    if not path.is_file():
        raise AtlasError(f"'{png}' has no evolution table beside it ({path.name})")
    names = pq.read_schema(path).names
    t = pq.read_table(path, columns=["epoch", "layer", "channel", "value", "shown"]
                      + (["row"] if "row" in names else [])).to_pydict()
    epochs = sorted(set(t["epoch"]))
    last = epochs[-1] if epochs else None
    rows: dict[Any, dict[str, Any]] = {}
    for n, (e, la, c, v, s) in enumerate(zip(t["epoch"], t["layer"], t["channel"], t["value"], t["shown"])):
        if s:
            key = t["row"][n] if "row" in t else (la, c)  # tables from before the row column: by channel
            r = rows.setdefault(key, {"layer": la, "channels": {}})
            r[f"epoch {e}"], r["channels"][e] = v, c
    moved = any(len(set(r["channels"].values())) > 1 for r in rows.values())
    out = []
    order = {la: i for i, la in enumerate(dict.fromkeys(t["layer"]))}
    for key, r in sorted(rows.items(), key=lambda kv: kv[0] if "row" in t else (order[kv[0][0]], kv[0][1])):
        row = {"layer": r["layer"], "channel": r["channels"].get(last)}
        row.update({f"epoch {e}": r.get(f"epoch {e}") for e in epochs})
        if moved:
            row.update({f"channel {e}": r["channels"].get(e) for e in epochs})
        out.append(row)
    return out
