"""Model input on the device: batches of image ids read, decoded and preprocessed.

Two decoders give the same pictures to within one grey level:

  cpu     PIL (the reference: `Preprocess`, which the renderer and the
          analyses use too), in DataLoader worker processes, or with
          --workers 0 in threads of the main process that decode while the
          model is idle (atlas/data/ahead.py): the same numbers either way.
  device  torchvision's JPEG decoder on `--device` (nvjpeg on a GPU, batched;
          libjpeg-turbo on a CPU); the workers only read file bytes. Resize
          (PIL's antialiased bilinear, as `F.interpolate(antialias=True)`
          computes it), crop and normalisation run on the device too, so a GPU
          is not left waiting on CPU cores. Files that are not JPEG, and JPEGs
          the device decoder refuses (CMYK on nvjpeg, say), are decoded and
          cropped by PIL, exactly as the cpu decoder does.

`auto` picks `device` for a folder dataset on a CUDA device whose decoder
works, else `cpu`. The two differ by at most one grey level per pixel (the
resize rounds in floating point, not in PIL's fixed point), which can swap
near-ties in a ranking like bf16 does; an atlas records which decoder built
it and a resumed build keeps it.
"""
from __future__ import annotations

import contextlib
import functools
import io
import warnings
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .ahead import DecodeAhead
from . import DecodedImages, decode_crop, decode_error, FileBytes, ImageSource, Preprocess, content_hash, open_rgb
from ..errors import AtlasError
from ..choices import DECODERS  # noqa: F401 - re-exported


# torchvision 0.29 deprecates its decoders in favour of TorchCodec but keeps them working; the warning
# would print once per worker and call site and says nothing a user of atlas can act on.
warnings.filterwarnings("ignore", message=r".*decoding and encoding capabilities of TorchVision are deprecated")

JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"
RESIZE_BYTES = 256 << 20  # float32 images resized in one call, at most


def choose_decoder(decode: str, source: ImageSource, dev: torch.device) -> str:
    """The decoder a build uses: `cpu` or `device` (see the module docstring)."""
    if decode not in DECODERS:
        raise AtlasError(f"unknown decoder '{decode}': use {', '.join(DECODERS)}")
    folder = source.kind in ("imagefolder", "flat")
    if decode == "device":
        if not folder:
            raise AtlasError(f"--decode device reads image files; dataset '{source.spec}' is {source.kind}")
        if not device_decoder_works(dev):
            raise AtlasError(f"--decode device: torchvision cannot decode JPEG on {dev}")
        return "device"
    if decode == "auto" and folder and dev.type == "cuda" and device_decoder_works(dev):
        return "device"
    return "cpu"


def device_decoder_works(dev: torch.device) -> bool:
    """Whether torchvision decodes a JPEG on `dev` (a build without nvjpeg, or a future torchvision
    without its decoders, falls back to the CPU workers)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        buf = io.BytesIO()
        Image.new("RGB", (16, 8), (200, 30, 10)).save(buf, "JPEG")
        x = decode_jpeg([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)],
                        mode=ImageReadMode.RGB, device=dev)[0]
        return tuple(x.shape) == (3, 8, 16)
    except Exception:  # any failure means: not on this machine
        return False


def chunk_batches(n: int, chunk_size: int, batch_size: int, chunks=None) -> list[tuple[int, list[int]]]:
    """(chunk, image ids) of the build's batches over `n` images, for `chunks` (default all): each chunk's
    images in order, `batch_size` at a time, the last of a chunk short (LayerMap.extract pads it). `atlas index`
    reads an atlas's images again in these batches (a pass over a sample only, in their subsets, padded to
    the same shape), so it computes what the build did."""
    nchunks = (n + chunk_size - 1) // chunk_size
    out = []
    for c in (range(nchunks) if chunks is None else chunks):
        lo, hi = c * chunk_size, min(n, (c + 1) * chunk_size)
        out += [(c, list(range(b, min(hi, b + batch_size)))) for b in range(lo, hi, batch_size)]
    return out


class EncodedImages(torch.utils.data.Dataset):
    """(kind, payload, image_id, error) for a list of ids: a JPEG's bytes ("jpeg"), or any other image
    decoded and cropped by PIL exactly as the cpu decoder does, uint8 (3, crop, crop) ("crop"): only
    crops cross the workers' shared memory, never a full-resolution PNG. What a worker does for the
    `device` decoder."""

    def __init__(self, source: ImageSource, preprocess: Preprocess, ids: Sequence[int]):
        self.source, self.pre, self.ids = source, preprocess, list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        image_id = self.ids[i]
        if self.source.kind == "cifar10":  # rows of a batch file: no JPEG to hand the device
            px, err, digest = decode_crop(self.source, self.pre, image_id)
            return "crop", None if px is None else torch.from_numpy(px).permute(2, 0, 1), image_id, err, digest
        path = self.source.root / self.source.records[image_id].path
        try:
            data = path.read_bytes()
            digest = content_hash(data)
            # a JPEG without its end marker is truncated: PIL calls that an error, and nvjpeg might
            # decode what is there, so PIL decides (cpu and device decoders then agree on what is readable)
            if data[:3] == JPEG_MAGIC and data[-2:] == JPEG_END:
                return "jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8), image_id, "", digest
            return "crop", _rgb_tensor(self.pre.crop_image(open_rgb(FileBytes(data, path)))), image_id, "", digest
        except Exception as e:  # a property of the file, recorded per image as DecodedImages does
            return "crop", None, image_id, decode_error(e), ""


def _rgb_tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def _as_lists(batch):
    return tuple(list(col) for col in zip(*batch))


class DeviceDecoder:
    """Turns a batch of EncodedImages items into normalised model input on `dev`."""

    def __init__(self, preprocess: Preprocess, dev: torch.device):
        self.pre, self.dev = preprocess, dev

    def __call__(self, kinds: list[str], payloads: list, errs: list[str]) -> tuple[torch.Tensor, list[str]]:
        errs = list(errs)
        pixels: list[torch.Tensor | None] = [None] * len(kinds)  # full-size, or already cropped:
        cropped = [k == "crop" for k in kinds]
        jpegs = [i for i, k in enumerate(kinds) if k == "jpeg" and not errs[i]]
        for i, x in zip(jpegs, self._decode_jpegs([payloads[i] for i in jpegs])):
            if x is None:  # the device decoder refused it: PIL, as the cpu decoder would
                try:
                    x = _rgb_tensor(self.pre.crop_image(open_rgb(io.BytesIO(payloads[i].numpy().tobytes()))))
                    cropped[i] = True
                except Exception as e:
                    errs[i] = decode_error(e)
                    continue
            pixels[i] = x
        for i, k in enumerate(kinds):
            if k == "crop" and not errs[i]:
                pixels[i] = payloads[i]
        return self._preprocess(pixels, cropped), errs

    def _decode_jpegs(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        from torchvision.io import ImageReadMode, decode_jpeg

        if not data:
            return []
        if self.dev.type == "cuda":
            # nvjpeg allocates its outputs on the current stream but decodes on a stream of its own that
            # does not wait for ours: memory the previous batch's kernels still use could be written over
            # (pytorch/vision PR 9606). The decoder blocks the host anyway; waiting first costs little.
            torch.cuda.current_stream(self.dev).synchronize()
        try:  # batched: nvjpeg decodes a list in one call, much faster than one by one
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.dev)
        except Exception:  # one bad file fails the whole call; find which, one by one
            out = []
            for d in data:
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=self.dev))
                except Exception:  # whatever the decoder raises, PIL gets its turn (DeviceDecoder.__call__)
                    out.append(None)
            return out

    def _preprocess(self, pixels: list[torch.Tensor | None], cropped: list[bool]) -> torch.Tensor:
        """Preprocess.crop_image + to_tensor on the device; images of one size are resized together, a
        slice at a time (a batch of 12-megapixel photos in float32 would be gigabytes)."""
        crop = self.pre.crop
        x = torch.zeros(len(pixels), 3, crop, crop, device=self.dev)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(pixels):
            if p is not None and cropped[i]:
                x[i] = p.to(self.dev, non_blocking=True).float()
            elif p is not None:
                by_size.setdefault(tuple(p.shape[1:]), []).append(i)
        for (h0, w0), group in by_size.items():
            step = max(1, RESIZE_BYTES // (3 * h0 * w0 * 4))
            for s in range(0, len(group), step):
                idx = group[s:s + step]
                imgs, h, w = torch.stack([pixels[i].to(self.dev, non_blocking=True) for i in idx]), h0, w0
                scale = self.pre.resize / min(w, h)
                if (w, h) != (round(w * scale), round(h * scale)):
                    nh, nw = max(crop, round(h * scale)), max(crop, round(w * scale))
                    # PIL resizes in uint8; rounding back to uint8 keeps the model's input quantised the same way
                    imgs = F.interpolate(imgs.float(), size=(nh, nw), mode="bilinear", antialias=True,
                                         align_corners=False).round_().clamp_(0, 255)
                    h, w = nh, nw
                top, left = (h - crop) // 2, (w - crop) // 2
                x[idx] = imgs[:, :, top:top + crop, left:left + crop].float()
        ok = torch.tensor([p is not None for p in pixels], device=self.dev).view(-1, 1, 1, 1)
        return torch.where(ok, self.pre.normalise(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), 0.0)


class InputBatches:
    """Model input for batches of image ids, on the device: (x, ids, errors, content hashes) per batch, in
    order.

    Errors are per image ("" when it decoded), and so are the hashes of the bytes decoded ("" for an error); an unreadable image's input is zeros, as the cpu decoder
    gives it. The build's mining pass and its switches pass both read through this, so the switches
    are recorded on the same pixels the ranking saw.
    """

    def __init__(self, source: ImageSource, preprocess: Preprocess, dev: torch.device, decoder: str,
                 workers: int, channels_last: bool = False):
        if decoder not in ("cpu", "device"):
            raise ValueError(f"decoder must be resolved to cpu or device (choose_decoder), got {decoder!r}")
        self.source, self.pre, self.dev, self.decoder, self.workers = source, preprocess, dev, decoder, workers
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._device_decoder = DeviceDecoder(preprocess, dev) if decoder == "device" else None
        self._ahead: DecodeAhead | None = None

    def __call__(self, batches: list[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        if not batches:
            return
        # Datasets are indexed by position in a list of every id, so batch_sampler can hand out image ids.
        all_ids = range(len(self.source))
        if self.decoder == "cpu" and self.workers == 0:
            yield from self._decode_in_threads(batches)
            return
        if self.decoder == "cpu":
            # The workers hand over (H, W, 3) inputs: stacked and permuted, a batch is channels-last with
            # no copy here, where the forward pass waits.
            loader = torch.utils.data.DataLoader(
                DecodedImages(self.source, self.pre, all_ids, channels_last=True), batch_sampler=batches,
                num_workers=self.workers, pin_memory=self.dev.type == "cuda")
            for x, ids, errs, digests in loader:
                x = x.to(self.dev, non_blocking=True).permute(0, 3, 1, 2)
                yield x.contiguous(memory_format=self.memory_format), ids, list(errs), list(digests)
            return
        loader = torch.utils.data.DataLoader(
            EncodedImages(self.source, self.pre, all_ids), batch_sampler=batches, num_workers=self.workers,
            collate_fn=_as_lists)
        for kinds, payloads, ids, errs, digests in loader:
            x, errs = self._device_decoder(kinds, payloads, errs)
            yield (x.contiguous(memory_format=self.memory_format), torch.tensor(ids, dtype=torch.int64), errs,
                   [d if not e else "" for d, e in zip(digests, errs)])

    def _decode_in_threads(self, batches: list[list[int]]):
        """The cpu decoder without worker processes: PIL in threads of this process (atlas/data/ahead.py
        says why), each batch normalised at once, exactly as the workers' images are one by one."""
        blank = np.zeros((self.pre.crop, self.pre.crop, 3), np.uint8)  # normalised, then zeroed
        ahead = self._ahead = DecodeAhead(functools.partial(decode_crop, self.source, self.pre), batches)
        try:
            for b, ids in enumerate(batches):
                items = ahead.batch(b)
                x = self.pre.normalise(torch.from_numpy(np.stack([p if p is not None else blank for p, _, _ in items])))
                errs = [e for _, e, _ in items]
                bad = [j for j, e in enumerate(errs) if e]
                if bad:
                    x[bad] = 0.0  # an unreadable image's input is zeros, as the workers give it
                x = x.to(self.dev).permute(0, 3, 1, 2)
                yield (x.contiguous(memory_format=self.memory_format), torch.tensor(ids, dtype=torch.int64), errs,
                       [d for _, _, d in items])
        finally:
            if self._ahead is ahead:  # a newer pass's, if this generator is finalised late, stays
                self._ahead = None
            ahead.close()

    def computing(self):
        """A context for the model's work on a batch: decoding threads wait meanwhile, so that the forward
        pass's threads have the cores (a no-op for worker processes and the device decoder)."""
        return self._ahead.paused() if self._ahead is not None else contextlib.nullcontext()
