"""One-pass switches: the max-pool switches captured while mining, cropped after the merge.

The final top-k (and so which images need switches, and inside which boxes) is known only once every
chunk is merged. Rather than decode and forward those images a second time, the miner keeps a running
top-k per layer across the chunks it mines, and for every image that beats a channel's running k-th
entry (value desc, image id asc: the order of atlas.mining) it records the window codes of the pools
below inside the bounding box of those channels' maxima. An image in the final top-k of a channel is in
the top-k of every subset of the images holding it, so it beat the running k-th entry when it was mined:
the captured boxes hold every final box (the union of fewer units' fields), and cropping them gives the
codes the two-pass path computes from the same forward pass.

Work files: `work/sw-CCCCC.zip`, one per chunk, written before the chunk's npz (whose presence marks the
chunk done): one stored (uncompressed) entry per image and pool, the packed codes (switches.pack), and
`boxes.json` with each entry's box. When a chunk is flushed, every capture file of this process's chunks
is checked against the running top-k: a file none of whose images is still in it is emptied, one with
fewer than half still in it is rewritten with those only. So the files hold at most about twice the
images of the running top-k plus one chunk, whatever the number of images (README, Scale).
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..util.files import atomic_write
from ..mining import TopK
from ..deconv.switches import SwitchRegion, pack, unpack, window_codes

BOXES = "boxes.json"

# The rule for one pass (BuildJob.resolve): capturing costs every image's pool indices (~3-5 % of a
# forward pass on zfnet, scripts/bench_whole_job.py) and the codes of every image that beats a running
# k-th entry; the second pass costs decoding the final top-k's images and forwarding them to the deepest
# pool (~60 % of a forward pass on zfnet). One pass wins unless the final top-k holds a small share of
# the images: it is chosen when the top-k's slots (channels x k) are at least this share of the images.
ONE_PASS_MIN_SHARE = 0.05


def one_pass_wins(chosen, k: int, n: int) -> bool:
    """The stated rule: one pass when channels x k >= ONE_PASS_MIN_SHARE x images, and at least one
    chosen layer has a pool below it (else there are no switches to capture)."""
    if not any(la.pools_below for la in chosen):
        return False
    return sum(la.channels for la in chosen) * k >= ONE_PASS_MIN_SHARE * n


def capture_file(work: Path, chunk: int) -> Path:
    return work / f"sw-{chunk:05d}.zip"


class SwitchCapture:
    """The running top-k of one process and the capture of the images that beat it (module docstring)."""

    def __init__(self, lmap, chosen, k: int, work: Path, chunk_size: int, owned_done=(), dev="cpu"):
        self.lmap, self.chosen, self.work, self.chunk_size = lmap, chosen, work, chunk_size
        self.running = {la.name: TopK(la.channels, k, dev) for la in chosen}
        self.files: list[int] = list(owned_done)  # this process's chunks whose capture files it prunes
        # each own file's image ids, as its boxes.json lists them: known when written (a resumed build's
        # earlier files: read once), so a prune opens only the files it rewrites
        self._ids: dict[int, set[int]] = {}
        self.pools = sorted({p for la in chosen for p in la.pools_below},
                            key=lambda p: lmap.pool_by_name[p].index)
        self._zip: zipfile.ZipFile | None = None
        self.peak_bytes = 0  # the most the capture files of this run held at once (the manifest says it)
        self._boxes: dict[str, dict[str, list[int]]] = {}

    def seed(self, tops: dict[str, TopK]) -> None:
        """Start from finished chunks' top-k (a resumed build): their images beat nothing new."""
        for name, t in tops.items():
            self.running[name].merge(t)

    def deepest(self) -> str:
        return self.pools[-1]

    def start(self, chunk: int) -> None:
        self.chunk = chunk
        # streamed batch by batch (a chunk's captures can be ~100 MB), under the name fsutil's temp files
        # have, so that an interrupted build's is swept on --resume
        fd, tmp = tempfile.mkstemp(prefix=f".{capture_file(self.work, chunk).name}.", suffix=".tmp", dir=self.work)
        os.close(fd)
        self._tmp = Path(tmp)
        self._zip = zipfile.ZipFile(self._tmp, "w", zipfile.ZIP_STORED)
        self._boxes = {}
        self._chunk_bytes = 0  # the chunk being captured, before its pruning: part of the peak

    def add(self, values: dict[str, tuple[torch.Tensor, torch.Tensor]], ids: torch.Tensor,
            indices: dict[str, torch.Tensor], rows: torch.Tensor | None) -> None:
        """One batch: values[layer] = (maxima (B, C), flat positions (B, C)) of the valid images `ids`;
        indices[pool]: the batch's pool indices (all its rows; `rows` picks the valid ones, None: all),
        used up: they are overwritten (window_codes in place)."""
        # per image and pool, the bounding box (y0, x0, y1, x1) of the beating units' regions
        boxes: dict[int, dict[str, list[int]]] = {}
        for la in self.chosen:
            v, p = values[la.name]
            run = self.running[la.name]
            kth_v, kth_i = run.values[:, -1], run.ids[:, -1]
            beats = (v > kth_v) | ((v == kth_v) & (ids.view(-1, 1) < kth_i))  # (B, C)
            run.update(v, ids, p)
            if not la.pools_below:
                continue
            hit = beats.any(1)
            if not bool(hit.any()):
                continue
            big = torch.iinfo(torch.int64).max
            y, x = p // la.width, p % la.width
            # one copy to the host per layer and batch, not one per image (a GPU would wait on each); amin/amax,
            # not min/max: the values alone (min(1) with its indices took ms per call on 2 busy CPU threads)
            corners = torch.stack([torch.where(beats, y, big).amin(1), torch.where(beats, x, big).amin(1),
                                   torch.where(beats, y, -1).amax(1), torch.where(beats, x, -1).amax(1),
                                   ids, hit.long()], 1).tolist()
            for lo_y, lo_x, hi_y, hi_x, image, any_hit in corners:
                if not any_hit:
                    continue
                for pool in la.pools_below:
                    a = self.lmap.region_below(la, pool, lo_y, lo_x)
                    b = self.lmap.region_below(la, pool, hi_y, hi_x)
                    box = [min(a[0], b[0]), min(a[1], b[1]), max(a[0] + a[2], b[0] + b[2]),
                           max(a[1] + a[3], b[1] + b[3])]
                    old = boxes.setdefault(image, {}).get(pool)
                    boxes[image][pool] = box if old is None else [min(old[0], box[0]), min(old[1], box[1]),
                                                                  max(old[2], box[2]), max(old[3], box[3])]
        if not boxes:
            return
        row_of = {int(i): j for j, i in enumerate(ids.tolist())}
        images = list(boxes)
        batch_rows = [row_of[i] if rows is None else int(rows[row_of[i]]) for i in images]
        for pool in self.pools:
            has = [n for n, i in enumerate(images) if pool in boxes[i]]
            if not has:
                continue
            # the codes of the whole maps of the batch's captured images at once (torch, every thread), then
            # cropped: a call per image and pool on int64 numpy arrays cost more than the rest of the capture
            geom = self.lmap.pool_by_name[pool].geometry
            codes = codes_of_rows(indices[pool], [batch_rows[n] for n in has], geom)
            for row, n in enumerate(has):
                y0, x0, y1, x1 = boxes[images[n]][pool]
                self._zip.writestr(f"{images[n]}/{pool}", pack(codes[row, :, y0:y1, x0:x1], geom.kernel))
        for image, pools in boxes.items():
            self._boxes[str(image)] = {pool: [y0, x0, y1 - y0, x1 - x0] for pool, (y0, x0, y1, x1) in pools.items()}

    def finish(self) -> None:
        """The chunk's capture file, in place before its npz is; then every own file pruned."""
        self._zip.writestr(BOXES, json.dumps(self._boxes))
        self._zip.close()
        self._chunk_bytes = self._tmp.stat().st_size
        self._zip = None
        os.replace(self._tmp, capture_file(self.work, self.chunk))
        self.files.append(self.chunk)
        self._ids[self.chunk] = {int(i) for i in self._boxes}
        self.prune()
        held = sum(capture_file(self.work, c).stat().st_size for c in self.files)
        self.peak_bytes = max(self.peak_bytes, held + self._chunk_bytes)

    def alive(self) -> set[int]:
        return {int(i) for t in self.running.values() for i in t.ids.reshape(-1).tolist()}

    def prune(self) -> None:
        alive = self.alive()
        for c in self.files:
            path = capture_file(self.work, c)
            if c not in self._ids:
                with zipfile.ZipFile(path) as z:
                    self._ids[c] = {int(i) for i in json.loads(z.read(BOXES))}
            ids = self._ids[c]
            keep = ids & alive
            if len(keep) * 2 >= len(ids):
                continue
            with zipfile.ZipFile(path) as z:
                boxes = {i: b for i, b in json.loads(z.read(BOXES)).items() if int(i) in keep}
                entries = {f"{i}/{pool}": z.read(f"{i}/{pool}") for i in boxes for pool in boxes[i]}

            def write(tmp: Path) -> None:
                with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as out:
                    for name, data in entries.items():
                        out.writestr(name, data)
                    out.writestr(BOXES, json.dumps(boxes))

            atomic_write(path, write, fsync=False)  # work files: a crash loses the chunk, not the atlas
            self._ids[c] = keep


def codes_of_rows(indices: torch.Tensor, rows: list[int], geom) -> np.ndarray:
    """window_codes of the batch's pool indices (N, C, H, W) at `rows`, in that order; the indices are
    used up (overwritten)."""
    if len(rows) * 2 < indices.shape[0]:
        return window_codes(indices[rows], geom, in_place=True)
    # at least half the rows (as in every batch until the running top-k settles): the codes of them all,
    # then the rows picked from those (uint8), rather than a copy of the int64 indices first
    codes = window_codes(indices, geom, in_place=True)
    return codes if rows == list(range(indices.shape[0])) else codes[rows]


class CapturedSwitches:
    """Reads the capture files back: the codes of an image's pool cropped to a final box."""

    def __init__(self, lmap, work: Path, chunk_size: int):
        self.lmap, self.work, self.chunk_size = lmap, work, chunk_size
        self._chunk, self._zip, self._boxes = None, None, {}

    def __call__(self, image: int, reg: SwitchRegion) -> np.ndarray:
        c = image // self.chunk_size
        if c != self._chunk:
            self.close()
            self._zip = zipfile.ZipFile(capture_file(self.work, c))
            self._boxes, self._chunk = json.loads(self._zip.read(BOXES)), c
        y0, x0, h, w = self._boxes[str(image)][reg.pool]
        if not (y0 <= reg.y0 and x0 <= reg.x0 and reg.y0 + reg.h <= y0 + h and reg.x0 + reg.w <= x0 + w):
            raise RuntimeError(f"image {image}: captured {reg.pool} box {(y0, x0, h, w)} misses the final box "
                               f"{(reg.y0, reg.x0, reg.h, reg.w)}")  # the capture rule is broken: a bug
        geom = self.lmap.pool_by_name[reg.pool].geometry
        channels = self.lmap.pool_by_name[reg.pool].channels
        codes = unpack(self._zip.read(f"{image}/{reg.pool}"), channels * h * w, geom.kernel)
        codes = codes.reshape(channels, h, w)
        return codes[:, reg.y0 - y0:reg.y0 - y0 + reg.h, reg.x0 - x0:reg.x0 - x0 + reg.w]

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
        self._zip, self._chunk = None, None

    @staticmethod
    def complete(work: Path, nchunks: int) -> bool:
        """Whether every chunk left a capture file (a chunk mined by the two-pass path, or by an older
        release, has none: the build then takes the second pass)."""
        return all(capture_file(work, c).is_file() for c in range(nchunks))
