"""Where the work runs: the `--device` option and how many decoding workers feed it.

`check_device` reads a device name without importing torch (the CLI checks `--device` with it while it
parses, and `atlas --help` must stay light); `resolve_device` gives the torch.device, refusing in one
line a device this machine does not have.
"""
from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from ..errors import AtlasError

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEVICES = "auto, cpu, cuda or cuda:N"  # what --device takes, as every message says it
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(device: str | None) -> str:
    """The device name, checked: `auto` (CUDA when there is a GPU, else CPU), `cpu`, `cuda` or `cuda:N`.

    Anything else (`tpu`, `cuda:x`, `gpu`) is an AtlasError, the same line wherever it was given."""
    if device is None:
        return "auto"
    name = str(device).strip().lower()
    if not _DEVICE.fullmatch(name):
        raise AtlasError(f"--device '{device}' is not a device: use {DEVICES} (N: a GPU's number, from 0)")
    return name


def keep_freed_memory() -> bool:
    """Ask the C allocator (glibc's malloc) to keep the memory a process frees, so the next batch's tensors
    reuse it: whether it could (Linux with glibc; elsewhere nothing changes).

    glibc hands every allocation above 32 MB (a batch's activation maps: zfnet's conv1 at batch 64 is
    300 MB) straight from the kernel and gives it back when it is freed, so each forward pass faults in
    and zeroes about 1 GB of fresh pages again: a quarter of zfnet's CPU time on this project's 2-core
    machine went to the kernel. With no mmap'd blocks and no trimming, freed memory stays in the heap;
    resident memory stays at the peak of one batch, which a build reaches anyway, and never grows with
    the images. The numbers computed do not change (scripts/BENCHMARKS.md: 1.3x on the mining pass).

    Process-wide and for good, so the CLI's `build` and `index` call it only when the `atlas` command or
    `python -m atlas` started the process (cli.base.run), never when a Python caller runs the CLI in its
    own process; a Python user who builds in a notebook can call it first, knowing the process then
    keeps its peak."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def resolve_device(device: str | None) -> "torch.device":
    """The torch.device for `device` (see check_device); a CUDA device this machine lacks is refused."""
    import torch

    name = check_device(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AtlasError(f"--device '{device}' was asked for, but no CUDA GPU is available (use auto or cpu)")
        count = torch.cuda.device_count()
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= count:
            have = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            raise AtlasError(f"--device '{device}' was asked for, but this machine has {count} CUDA GPU"
                             f"{'s' if count != 1 else ''} ({have})")
    return torch.device(name)


def default_workers(dev: "torch.device") -> int:
    n = _cores()
    if dev.type == "cuda":
        # a GPU outruns PIL: every core but the main process's decodes (device decoding needs far fewer,
        # its workers only read files, but idle ones cost nothing)
        return min(16, max(1, n - 1))
    # On a CPU, serial decoding in the main process (a DataLoader without workers: training, evolution)
    # makes the forward pass wait for every batch's images. One worker per four cores (at least one)
    # decodes while the model computes: PIL's decode and resize of a 500x375 JPEG is about a tenth of
    # zfnet's forward pass on a core. The build and `atlas index` decode in threads instead on fewer than
    # four cores (input_workers says why).
    return max(1, min(8, n // 4))


def input_workers(dev: "torch.device") -> int:
    """Decoding processes for InputBatches (the build's and `atlas index`'s forward passes), whose cpu
    decoder without processes decodes in threads while the model is idle (atlas/data/ahead.py): that,
    on a CPU of fewer than four cores, where a worker process overlaps nothing, as the forward pass keeps
    the cores busy, and stalls it by taking a core from one of its threads mid-layer (whole builds of
    zfnet and resnet50 on 2 cores ran 3-4 % faster so: scripts/BENCHMARKS.md, issue 24's seventh pass).
    Elsewhere, and on a GPU, default_workers."""
    if dev.type == "cpu" and _cores() < 4:
        return 0
    return default_workers(dev)


def _cores() -> int:
    # under torchrun every local rank starts its own workers: share the cores among them
    return max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


# The build's memory layout, on every device: channels-last is what oneDNN's bf16 kernels want, and it
# ran zfnet's and resnet50's fp32 forward pass 1.4x faster than contiguous on an AMX Xeon (issue 24's
# figures; within noise of each other on this project's loaded AVX-512 machine). An atlas records its layout; a resumed build and `atlas index`
# afterwards keep it (one numeric path per atlas: the layout picks the kernels, which round differently).
MEMORY_FORMATS = ("channels_last", "contiguous")


def recorded_memory_format(options: dict) -> str:
    """The layout an atlas (or an interrupted build) was computed in: its record, else what builds
    used before it was recorded (channels-last on a GPU only)."""
    fmt = options.get("memory_format")
    if fmt in MEMORY_FORMATS:
        return fmt
    return "channels_last" if str(options.get("device", "cpu")).startswith("cuda") else "contiguous"


def cpu_bf16_kernels() -> str | None:
    """The CPU's bf16 matrix instructions oneDNN uses ("amx" or "avx512_bf16"), None without them."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    if "amx_bf16" in flags:
        return "amx"
    return "avx512_bf16" if "avx512_bf16" in flags else None


def bf16_hint(dev: "torch.device", precision: str, speedup: float | None) -> str | None:
    """One line for an fp32 build on a CPU with bf16 kernels (AMX or AVX512-BF16) where bf16 ran at least
    twice as fast: `speedup` is what the build measured on one of its own batches (build.bf16_speedup;
    None: not measured). The gain depends on the model as much as on the CPU: on this project's
    AVX512-BF16 machine (channels-last, freed memory kept) zfnet's forward pass ran 1.6x faster in bf16
    and resnet50's 1.9x."""
    if precision != "fp32" or dev.type != "cpu" or speedup is None or speedup < 2.0:
        return None
    isa = cpu_bf16_kernels()
    if isa is None:
        return None
    return (f"--precision bf16 ran this model's forward pass {speedup:.1f}x faster on this CPU "
            f"({'AMX' if isa == 'amx' else 'AVX512-BF16'}); its top-k is nearly the same (scripts/BENCHMARKS.md)")
