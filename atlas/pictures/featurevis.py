"""Feature visualization by optimization: the image a channel wants (Olah, Mordvintsev & Schubert,
"Feature Visualization", Distill 2017), the recipe of their article and of Lucid, in PyTorch.

This module is the algorithm alone (no file, no cache, no atlas): `optimize` takes a model's LayerMap,
the targets and a `Recipe`, and returns the images and their figures. `atlas.pictures.visualizations` is the
plumbing around it (the cache, the colour statistics of an atlas, the SQL function).

The recipe, and why each part:

* **Parameterisation.** Each image is a scaled Fourier spectrum (per colour channel, real and imaginary
  parts), each frequency f scaled by 1 / max(|f|, 1/side) (decay power 1): in that basis steepest ascent
  is whitened, so the low frequencies an image is mostly made of move as fast as the high ones, and the
  optimum is not buried in high-frequency noise. The spectrum's inverse FFT (orthonormal, /4: Lucid's
  constant) gives three decorrelated colour channels, which the square root of the dataset's colour
  covariance (its SVD, normalised to a largest column norm of 1) maps to RGB, then a sigmoid to [0, 1].
  Colours therefore move along the directions natural images vary in.
* **Transformation robustness.** At every step each image is padded (with grey), jittered, scaled
  (0.90 to 1.10) and rotated (-10 to 10 degrees, 0 five times as likely) and jittered again before the
  model sees it: Lucid's `standard_transforms`, their pixel amounts scaled from its 224 px to the model's
  input side. An image that excites the unit only at one alignment is adversarial noise; one that
  excites it under all of them is a feature. Padding, the two jitters, the scale and the rotation are
  composed into one bilinear resampling per image (the area the image does not cover is grey, which is
  what padding adds), with a backward pass written as a gather so that it is deterministic on a GPU too
  (`grid_sample`'s backward adds with atomics there).
* **Preprocessing inside the loop**: the model's own mean and std are applied to the [0, 1] image, so
  the optimiser works in pixels and the model sees what it was trained on.
* **Adam** (learning rate 0.05), a fixed number of steps (512).
* **Objectives**: a channel (the mean of its map) or a unit (one position of the map: the centre, or a
  given one), for conv layers; the unit itself for fc layers. Diversity: several images of one channel
  pushed apart by the cosine similarity of their Gram matrices at the layer (Lucid's `diversity`).

Determinism: every image has its own random stream (a torch.Generator seeded from (seed, layer, channel,
image)), from which its initial spectrum and every transformation are drawn; the loss is summed over
the batch, so an image's gradient is its own; and the batch is padded to the recipe's fixed batch size,
so the kernels see the same shapes. The same request therefore gives the same bytes whether a channel
is optimized alone or in a batch of its layer (tests/test_pictures_featurevis.py checks it).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..errors import AtlasError

VERSION = "featurevis-v1"  # the recipe's version: bumping it keys a new cache
# Lucid's colour correlation of ImageNet (its square root, SVD form): used only when an atlas's own
# images cannot be read to estimate it.
IMAGENET_COLOUR = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))
MAGIC = 4.0  # Lucid's constant dividing the inverse FFT: a larger one starts less saturated
OBJECTIVES = ("channel", "unit")


@dataclass(frozen=True)
class Recipe:
    """Everything an image depends on besides the model, the target and the colour matrix."""

    steps: int = 512
    lr: float = 0.05
    seed: int = 0
    batch_size: int = 8           # images per optimisation batch, padded to it: part of the result
    diversity: int = 1            # images per channel; above 1 they are pushed apart
    diversity_weight: float = 1.0  # of the diversity term, relative to the channel's objective (below)
    decay_power: float = 1.0
    redirect_relu: bool = True    # Lucid's redirected ReLU gradient (below)
    # Lucid's standard_transforms at 224 px: pad 12, jitter 8, scale, rotate, jitter 4
    pad: int = 12
    jitter: tuple[int, int] = (8, 4)
    scales: tuple[float, ...] = tuple(1 + (i - 5) / 50.0 for i in range(11))
    angles: tuple[float, ...] = tuple(range(-10, 11)) + (0,) * 5

    def check(self) -> None:
        if self.steps < 1:
            raise AtlasError(f"steps must be at least 1 (got {self.steps})")
        if self.batch_size < 1:
            raise AtlasError(f"batch size must be at least 1 (got {self.batch_size})")
        if self.diversity < 1:
            raise AtlasError(f"diversity must be at least 1 image per channel (got {self.diversity})")
        if not self.lr > 0:
            raise AtlasError(f"learning rate must be positive (got {self.lr})")

    @property
    def slots(self) -> int:
        """The padded batch: a whole number of channels' images, at least `batch_size` images."""
        d = self.diversity
        return max(d, -(-self.batch_size // d) * d)

    def amounts(self, side: int) -> tuple[int, int, int]:
        """(pad, jitter1, jitter2) in pixels of a `side` px input: Lucid's 224 px amounts scaled."""
        f = side / 224.0
        return (max(1, round(self.pad * f)), *(max(1, round(j * f)) for j in self.jitter))

    def key(self) -> dict[str, Any]:
        return {"version": VERSION, **asdict(self)}


@dataclass(frozen=True)
class Target:
    """What one channel's images maximise: the mean of its map, or the unit at (y, x) (None: centre)."""

    layer: str
    channel: int
    objective: str = "channel"
    unit: tuple[int, int] | None = None

    def label(self) -> str:
        if self.objective == "channel":
            return "channel"
        return "unit-centre" if self.unit is None else f"unit-{self.unit[0]}-{self.unit[1]}"


@dataclass
class Visualization:
    """One optimized image (index `image` of the target's `diversity` images) and its figures."""

    target: Target
    image: int
    pixels: torch.Tensor          # (3, S, S) uint8, what is saved
    objective_start: float        # the objective under the first step's transformation
    objective_end: float          # ... and under the last's
    objective: float              # the objective on the finished, untransformed, quantised image
    map_max: float                # the spatial maximum of the channel's map on that image
    unit_yx: tuple[int, int] | None = None
    seconds: float = 0.0          # this image's share of its batch's time
    history: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# randomness: one stream per image
# ---------------------------------------------------------------------------------------------------
def generator(seed: int, layer: str, channel: int, image: int = 0) -> torch.Generator:
    """The image's own random stream: everything random about it is drawn from here, on the CPU, so
    neither the batch it is in nor the device changes what is drawn."""
    digest = hashlib.sha256(f"{VERSION}/{seed}/{layer}/{channel}/{image}".encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


# ---------------------------------------------------------------------------------------------------
# parameterisation: scaled Fourier basis, decorrelated colour
# ---------------------------------------------------------------------------------------------------
def _frequencies(h: int, w: int) -> torch.Tensor:
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


def spectrum_scale(side: int, decay_power: float = 1.0) -> torch.Tensor:
    """(1, 1, S, S//2+1, 1): the per-frequency scale 1 / max(|f|, 1/S) ** decay_power."""
    f = _frequencies(side, side)
    scale = 1.0 / torch.clamp(f, min=1.0 / side) ** decay_power
    return scale.float()[None, None, :, :, None]


def colour_matrix(colour) -> torch.Tensor:
    """The 3x3 square root of a colour covariance (SVD form), normalised to a largest column norm of 1."""
    c = torch.tensor(colour, dtype=torch.float32)
    if c.shape != (3, 3) or not torch.isfinite(c).all():
        raise AtlasError(f"a colour correlation is a finite 3x3 matrix (got {tuple(c.shape)})")
    norm = torch.linalg.vector_norm(c, dim=0).max()
    return c / norm if norm > 0 else torch.eye(3)


def colour_correlation(pixels: torch.Tensor) -> list[list[float]]:
    """The square root of the colour covariance of `pixels` ((N, 3) RGB in [0, 1]) in Lucid's form,
    U sqrt(S) of its SVD, each column's sign chosen so its largest entry is positive (reproducible)."""
    x = pixels.double()
    x = x - x.mean(0, keepdim=True)
    cov = x.T @ x / max(1, x.shape[0] - 1)
    u, s, _ = torch.linalg.svd(cov)
    u = u * torch.where(u.gather(0, u.abs().argmax(0, keepdim=True)) < 0, -1.0, 1.0)
    m = u * s.clamp(min=0).sqrt()[None, :]
    return [[round(float(v), 6) for v in row] for row in m]


def to_rgb(spectrum: torch.Tensor, scale: torch.Tensor, colour: torch.Tensor, side: int) -> torch.Tensor:
    """(B, 3, S, S) images in [0, 1] from (B, 3, S, S//2+1, 2) spectra."""
    z = torch.view_as_complex((scale * spectrum).contiguous())
    img = torch.fft.irfftn(z, s=(side, side), dim=(-2, -1), norm="ortho") / MAGIC
    img = torch.einsum("ij,bjhw->bihw", colour, img)  # decorrelated -> RGB
    return torch.sigmoid(img)


# ---------------------------------------------------------------------------------------------------
# transformation robustness: one affine resampling per image, deterministic both ways
# ---------------------------------------------------------------------------------------------------
def _tent(d: torch.Tensor) -> torch.Tensor:
    return torch.clamp(1.0 - d.abs(), min=0.0)


def _sample_points(A: torch.Tensor, b: torch.Tensor, side: int):
    """Input coordinates (y, x) sampled by each output pixel: v = A p + b, p the output pixel's (y, x)."""
    idx = torch.arange(side, dtype=A.dtype, device=A.device)
    py, px = idx.view(1, side, 1), idx.view(1, 1, side)
    vy = A[:, 0, 0, None, None] * py + A[:, 0, 1, None, None] * px + b[:, 0, None, None]
    vx = A[:, 1, 0, None, None] * py + A[:, 1, 1, None, None] * px + b[:, 1, None, None]
    return vy, vx  # (B, S, S) each


def _taps(img: torch.Tensor, y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum over k of w[:, k] * img at the integer points (y[:, k], x[:, k]) (all (B, K, S, S); points
    outside the image clamped in, their weight 0): one gather for every tap, summed in a fixed order."""
    B, C, S, _ = img.shape
    K = y.shape[1]
    flat = (y.clamp(0, S - 1) * S + x.clamp(0, S - 1)).view(B, 1, K * S * S).expand(B, C, K * S * S)
    vals = torch.gather(img.reshape(B, C, S * S), 2, flat).view(B, C, K, S, S)
    return (vals * w.unsqueeze(1)).sum(2)


def _inside(y: torch.Tensor, x: torch.Tensor, side: int) -> torch.Tensor:
    return (y >= 0) & (y < side) & (x >= 0) & (x < side)


def _warp_forward(img: torch.Tensor, A: torch.Tensor, b: torch.Tensor, fill: float) -> torch.Tensor:
    S = img.shape[-1]
    vy, vx = _sample_points(A, b, S)
    y0, x0 = torch.floor(vy), torch.floor(vx)
    fy, fx = (vy - y0).unsqueeze(1), (vx - x0).unsqueeze(1)
    dy = torch.tensor([0, 0, 1, 1], device=img.device).view(1, 4, 1, 1)
    dx = torch.tensor([0, 1, 0, 1], device=img.device).view(1, 4, 1, 1)
    yy, xx = y0.long().unsqueeze(1) + dy, x0.long().unsqueeze(1) + dx
    wy = torch.where(dy == 0, 1.0 - fy, fy)
    wx = torch.where(dx == 0, 1.0 - fx, fx)
    return _taps(img - fill, yy, xx, wy * wx * _inside(yy, xx, S)) + fill


class _Warp(torch.autograd.Function):
    """Bilinear resampling at v = A p + b, outside the image `fill`. Its backward is the adjoint written
    as a gather (for each input pixel, the few output pixels that sampled it, summed in a fixed order),
    not the scatter-add autograd would use: on a GPU that adds with atomics, in no fixed order."""

    @staticmethod
    def forward(ctx, img, A, b, fill):
        ctx.save_for_backward(A, b)
        ctx.side = img.shape[-1]
        return _warp_forward(img, A, b, fill)

    @staticmethod
    def backward(ctx, grad):
        A, b = ctx.saved_tensors
        S = ctx.side
        Ainv = torch.linalg.inv(A.double()).to(A.dtype)
        idx = torch.arange(S, dtype=A.dtype, device=A.device)
        qy, qx = idx.view(1, 1, S, 1), idx.view(1, 1, 1, S)
        ry, rx = qy - b[:, 0, None, None, None], qx - b[:, 1, None, None, None]
        col = lambda M, i, j: M[:, i, j, None, None, None]  # noqa: E731
        py = col(Ainv, 0, 0) * ry + col(Ainv, 0, 1) * rx  # the output point that samples q exactly
        px = col(Ainv, 1, 0) * ry + col(Ainv, 1, 1) * rx
        # the output pixels that sample q: |A (p - p0)| < 1 per axis, so |p - p0| < the row sums of
        # |A^-1|, and p = round(p0) + o with |o| < that + 1/2 (Lucid's ranges: o in -1..1)
        reach = int(math.ceil(float(Ainv.abs().sum(-1).max()) + 0.5 + 1e-6)) - 1
        offs = torch.arange(-reach, reach + 1, device=A.device)
        n = offs.numel()
        oy, ox = offs.repeat_interleave(n).view(1, -1, 1, 1), offs.repeat(n).view(1, -1, 1, 1)
        yy, xx = torch.round(py).long() + oy, torch.round(px).long() + ox  # (B, K, S, S)
        fy, fx = yy.to(A.dtype), xx.to(A.dtype)
        sy = col(A, 0, 0) * fy + col(A, 0, 1) * fx + b[:, 0, None, None, None]  # where p samples, as the
        sx = col(A, 1, 0) * fy + col(A, 1, 1) * fx + b[:, 1, None, None, None]  # forward pass computes it
        w = _tent(sy - qy) * _tent(sx - qx) * _inside(yy, xx, S)
        return _taps(grad, yy, xx, w), None, None, None


def warp(img: torch.Tensor, A: torch.Tensor, b: torch.Tensor, fill: float = 0.5) -> torch.Tensor:
    """img (B, C, S, S) resampled at v = A p + b (pixel coordinates (y, x), bilinear, `fill` outside)."""
    return _Warp.apply(img, A, b, fill)


def draw_transform(g: torch.Generator, recipe: Recipe, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's transformation of one image, from its own stream: (A (2, 2), b (2,)) of `warp`.

    Lucid's order on the padded image: jitter, scale, rotate (both about the centre), jitter; so an
    output pixel p samples v = R(-angle) (p - c - t2) / scale - t1 + c."""
    _, j1, j2 = recipe.amounts(side)
    t1 = torch.randint(-j1, j1 + 1, (2,), generator=g).double()
    s = recipe.scales[int(torch.randint(len(recipe.scales), (1,), generator=g))]
    a = math.radians(recipe.angles[int(torch.randint(len(recipe.angles), (1,), generator=g))])
    t2 = torch.randint(-j2, j2 + 1, (2,), generator=g).double()
    cos, sin = math.cos(a), math.sin(a)
    A = torch.tensor([[cos, sin], [-sin, cos]], dtype=torch.float64) / s  # R(-a) in (y, x) order, / s
    c = (side - 1) / 2.0
    centre = torch.tensor([c, c], dtype=torch.float64)
    b = -A @ (centre + t2) - t1 + centre
    return A.float(), b.float()


# ---------------------------------------------------------------------------------------------------
# objectives
# ---------------------------------------------------------------------------------------------------
def unit_position(target: Target, height: int, width: int) -> tuple[int, int]:
    if target.unit is None:
        return height // 2, width // 2
    y, x = target.unit
    if not (0 <= y < height and 0 <= x < width):
        raise AtlasError(f"unit ({y}, {x}) is outside {target.layer}'s {height}x{width} map")
    return int(y), int(x)


def _objective(act: torch.Tensor, targets: list[Target | None]) -> torch.Tensor:
    """Per slot: the channel's mean over its map, or the unit's value (0 for a padding slot)."""
    vals = []
    for i, t in enumerate(targets):
        if t is None:
            vals.append(act.new_zeros(()))
            continue
        a = act[i, t.channel]
        if a.dim() == 0:  # an fc layer: the unit is the channel
            vals.append(a)
        elif t.objective == "channel":
            vals.append(a.mean())
        else:
            y, x = unit_position(t, a.shape[-2], a.shape[-1])
            vals.append(a[y, x])
    return torch.stack(vals)


def _diversity(act: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """Per slot: the mean cosine similarity of its Gram matrix with those of its channel's other images
    (Lucid's diversity, per group; 0 where a channel has one image)."""
    out = act.new_zeros(act.shape[0])
    if act.dim() != 4:
        return out
    for g in groups:
        if len(g) < 2:
            continue
        f = act[g].flatten(2)
        gram = F.normalize((f @ f.transpose(1, 2)).flatten(1), dim=1)
        sim = gram @ gram.T
        n = len(g)
        out = out.index_put((torch.tensor(g, device=act.device),), (sim.sum(1) - sim.diagonal()) / (n - 1))
    return out


# ---------------------------------------------------------------------------------------------------
# ReLUs that let the gradient through where it would be lost (Lucid's redirected ReLU gradient)
# ---------------------------------------------------------------------------------------------------
class _RedirectedReLU(torch.autograd.Function):
    """ReLU whose backward, for an image whose gradient the ReLU would block entirely (every unit of it
    negative where the gradient is: a channel silent on the grey starting image), lets the gradient
    through wherever it raises the input. Without it such a channel never moves off zero."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        on = x > 0
        if x.dim() < 2:
            return grad * on
        # per image, so images stay independent: does anything get through the ReLU as it is?
        blocked = ~(on & (grad != 0)).flatten(1).any(1)
        # where it does not, let through all but what would push a negative input further down (the loss
        # is minimised: a positive gradient lowers the input)
        keep = on | (blocked.view(-1, *([1] * (x.dim() - 1))) & ~((x < 0) & (grad > 0)))
        return grad * keep


class _RedirectReLUs(torch.overrides.TorchFunctionMode):
    """Every ReLU the model runs (nn.ReLU, F.relu, torch.relu, Tensor.relu, in place or not) computed by
    _RedirectedReLU, whatever the model's code: a torch function mode, so it needs no access to the
    model's modules, and it holds in this thread only."""

    RELUS = {torch.relu, torch.relu_, F.relu, torch.Tensor.relu, torch.Tensor.relu_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.RELUS:
            return _RedirectedReLU.apply(args[0])
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _deterministic(device: torch.device):
    """cuDNN's deterministic kernels while optimising on a GPU (restored after)."""
    if device.type != "cuda":
        yield
        return
    import torch.backends.cudnn as cudnn

    before = (cudnn.deterministic, cudnn.benchmark)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = before


def optimize(lmap, targets: list[Target], recipe: Recipe, *, mean, std, colour, device: str | torch.device = "cpu",
             scales: dict[tuple[str, int], float] | None = None,
             step_callback: Callable[[int], None] | None = None) -> list[Visualization]:
    """Optimize `recipe.diversity` images for each target, in padded batches of `recipe.slots` images.

    lmap: the model's `atlas.net.LayerMap` (the activation is read through `LayerMap.extract`, the
    build's own call, so any model the atlas builds for works); mean, std: the model's preprocessing
    (3 values each); colour: the 3x3 colour correlation (`colour_correlation`); scales: per (layer,
    channel) the size of its activations (its dataset maximum), which sets the diversity term's weight
    so that one recipe suits every model (default 1). step_callback(images) after each step of a batch.
    """
    recipe.check()
    device = torch.device(device)
    S = int(lmap.image_size)
    scale = spectrum_scale(S, recipe.decay_power).to(device)
    cmat = colour_matrix(colour).to(device)
    m = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    for t in targets:
        if t.layer not in lmap.by_name:
            raise AtlasError(f"unknown layer '{t.layer}': valid layers are {', '.join(lmap.by_name)}")
        la = lmap.by_name[t.layer]
        if not 0 <= t.channel < la.channels:
            raise AtlasError(f"channel {t.channel} is out of range for {t.layer} (0..{la.channels - 1})")
        if t.objective not in OBJECTIVES:
            raise AtlasError(f"unknown objective '{t.objective}': choose one of {', '.join(OBJECTIVES)}")
        if t.objective == "unit" and la.kind != "fc":
            unit_position(t, la.height, la.width)
    per = recipe.diversity
    per_batch = recipe.slots // per
    out: list[Visualization] = []
    for start in range(0, len(targets), per_batch):
        out += _optimize_batch(lmap, targets[start:start + per_batch], recipe, S, scale, cmat, m, s, device,
                               scales or {}, step_callback)
    return out


def _optimize_batch(lmap, targets, recipe, S, scale, cmat, mean, std, device, scales, step_callback):
    t0 = time.perf_counter()
    B, per = recipe.slots, recipe.diversity
    slot_target: list[Target | None] = [None] * B
    gens: list[torch.Generator | None] = [None] * B
    groups: list[list[int]] = []
    layers = sorted({t.layer for t in targets}, key=lambda n: list(lmap.by_name).index(n))
    for n, t in enumerate(targets):
        groups.append(list(range(n * per, (n + 1) * per)))
        for i in range(per):
            slot_target[n * per + i] = t
            gens[n * per + i] = generator(recipe.seed, t.layer, t.channel, i)
    init = torch.zeros((B, 3, S, S // 2 + 1, 2))
    for k, g in enumerate(gens):
        if g is not None:  # padding slots stay a flat grey image and draw nothing
            init[k] = torch.randn((3, S, S // 2 + 1, 2), generator=g) * 0.01
    spectrum = init.to(device).requires_grad_(True)
    opt = torch.optim.Adam([spectrum], lr=recipe.lr, foreach=False)
    ident = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    weight = torch.tensor([recipe.diversity_weight * scales.get((t.layer, t.channel), 1.0) if t else 0.0
                           for t in slot_target], device=device)
    history: list[list[float]] = [[] for _ in range(B)]
    with _deterministic(device), torch.enable_grad():
        for step in range(recipe.steps):
            As, bs = [], []
            for g in gens:
                if g is None:
                    As.append(ident)
                    bs.append(torch.zeros(2))
                else:
                    A, b = draw_transform(g, recipe, S)
                    As.append(A)
                    bs.append(b)
            img = to_rgb(spectrum, scale, cmat, S)
            x = (warp(img, torch.stack(As).to(device), torch.stack(bs).to(device)) - mean) / std
            with _RedirectReLUs() if recipe.redirect_relu else contextlib.nullcontext():
                acts = lmap.extract(x, layers)
            obj = torch.zeros(B, device=device)
            for la in layers:
                sel = [t if t is not None and t.layer == la else None for t in slot_target]
                obj = obj + _objective(acts[la], sel)
            loss_terms = obj
            if per > 1:
                div = torch.zeros(B, device=device)
                for la in layers:
                    div = div + _diversity(acts[la], [g for g, t in zip(groups, targets) if t.layer == la])
                loss_terms = obj - weight * div
            # summed over the batch: each image's gradient is its own, whatever the others are
            (grad,) = torch.autograd.grad(-loss_terms.sum(), [spectrum])
            spectrum.grad = grad
            opt.step()
            vals = obj.detach().cpu().tolist()
            for k in range(B):
                history[k].append(vals[k])
            if step_callback is not None:
                step_callback(len(targets) * per)
        with torch.no_grad():
            img = to_rgb(spectrum.detach(), scale, cmat, S)
            pixels = torch.round(img.clamp(0, 1) * 255).to(torch.uint8)
            x = (pixels.float() / 255.0 - mean) / std
            acts = lmap.extract(x, layers)
            objective = torch.zeros(B, device=device)
            maxima = [0.0] * B
            units: list[tuple[int, int] | None] = [None] * B
            for la in layers:
                sel = [t if t is not None and t.layer == la else None for t in slot_target]
                objective = objective + _objective(acts[la], sel)
                a = acts[la]
                for k, t in enumerate(sel):
                    if t is not None:
                        v = a[k, t.channel]
                        maxima[k] = float(v.max())
                        if t.objective == "unit" and v.dim() == 2:
                            units[k] = unit_position(t, v.shape[-2], v.shape[-1])
    seconds = (time.perf_counter() - t0) / max(1, len(targets) * per)
    pixels, objective = pixels.cpu(), objective.cpu().tolist()
    res = []
    for k, t in enumerate(slot_target):
        if t is None:
            continue
        res.append(Visualization(t, k % per, pixels[k], history[k][0], history[k][-1], objective[k], maxima[k],
                                 units[k], seconds, history[k]))
    return res
