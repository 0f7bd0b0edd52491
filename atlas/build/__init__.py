"""The build job: stream a dataset through a model once and write an atlas.

Plumbing only: the statistics live in `mining`, the switch encoding in `switches`, the tables' layout
in `tables`, the numeric path (every batch at the full batch size) in `layers.LayerMap.extract`.

How it survives interruption: images are processed in fixed chunks. Each finished chunk leaves its
partial top-k, moments and activation rows in `ATLAS.partial/work/`, written atomically. `--resume`
skips finished chunks; the final merge runs over chunk files in chunk order, so a resumed build gives
the same bytes as an uninterrupted one. Only a complete atlas is renamed to ATLAS, and one build (or
index build) of an atlas runs at a time (`atlas.util.lock`).

Similarity indexes (`atlas.search.indexing`) are built in the staging folder before it is published: conv
layers from the activations table, fc layers (fc7) from the vectors each chunk keeps in
`work/vec-CCCCC.npz` (float16: the classifier is cheap next to the convs, and no second pass is needed).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from ..store.formats import FORMAT_VERSION, __version__
from ..data import Preprocess, open_dataset
from ..util.device import bf16_hint, cpu_bf16_kernels, input_workers, recorded_memory_format, resolve_device
from ..util.distributed import ranks_from_env
from ..util import bounds
from ..errors import AtlasError
from ..util.files import atomic_write, atomic_write_json, atomic_write_parquet, publish_dir, remove_temp_files, torch_save_atomic
from ..util.heap import keep_memory_flat
from ..data.inputs import DECODERS, InputBatches, choose_decoder, chunk_batches
from ..net import LayerMap
from ..util.lock import writer_lock
from ..mining import Moments, TopK, spatial_max
from ..models.preprocessing import three
from ..models.registry import contrast_norm_option, load_model, model_record, preprocessing_for
from ..util.progress import Progress
from ..search.indexing import ChunkVectors, MinerPlan, build_indexes, layer_vectors, plan_for_build, vector_arrays
from .capture import CapturedSwitches, SwitchCapture, capture_file, one_pass_wins
from ..deconv.switches import window_codes
from .tables import switch_regions, top_rows, write_activations, write_switches, write_tables
from ..choices import PRECISIONS  # noqa: F401 - re-exported

UNREADABLE_SHOWN = 5  # the build's last lines name this many unreadable images
# An fp32 build on a CPU with bf16 kernels times one batch in bf16 (twice: the first call picks the
# kernels) to tell whether bf16 would be twice as fast: only in builds of this many batches or more,
# where that costs under 1 %.
PROBE_MIN_BATCHES = 100
PROBE_BATCH = 2  # the first batches warm the fp32 kernels up


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """What a build computes and how: every option but where it reads and writes (model, data, out,
    weights) and how the run goes (resume, overwrite, progress). Validated once, here, with the messages
    the CLI shows; `atlas build`'s flags are these fields (tests/test_cli_vocabulary.py checks it)."""

    k: int = 9
    layers: str | list[str] | None = None
    batch_size: int = 64
    chunk_size: int | None = None
    device: str = "auto"
    workers: int | None = None
    precision: str = "fp32"
    decode: str = "auto"
    image_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    contrast_norm: bool | None = None
    seed: int = 0
    activations: bool = True
    switches: bool = True
    index: bool = True
    index_layers: str | list[str] | None = None

    def __post_init__(self):
        for name in ("k", "batch_size", "chunk_size", "workers", "image_size", "seed"):
            bounds.check(name, getattr(self, name))
        if self.precision not in PRECISIONS:
            raise AtlasError(f"unknown precision '{self.precision}': use {' or '.join(PRECISIONS)}")
        if self.decode not in DECODERS:
            raise AtlasError(f"unknown decoder '{self.decode}': use {', '.join(DECODERS)}")
        for name in ("mean", "std"):  # three numbers, kept as a list: the manifest's JSON and the resume check
            object.__setattr__(self, name, three(getattr(self, name), f"--{name}"))

    def record(self, **resolved: Any) -> dict[str, Any]:
        """The options as the manifest and the resume check store them, with `resolved` values (the
        chunk size, the decoder, the layers' names) in place of their defaults."""
        return {**dataclasses.asdict(self), **resolved}


def build(model: str | torch.nn.Module, data: str, out: str | Path, *, weights: str | None = None,
          resume: bool = False, overwrite: bool = False, progress: bool | None = None,
          log: Callable[[str], None] | None = None, options: BuildOptions | None = None,
          **option_values: Any) -> Path:
    """Run the build job; returns the path of the published atlas.

    The options are a BuildOptions, or its fields as keywords (`k=4, batch_size=8`). `model`: what
    `--model` takes (atlas.models.registry), or an nn.Module (reopening the atlas then needs it passed
    again: atlas.open(path, model=net))."""
    opts = options if options is not None else BuildOptions(**option_values)
    out = Path(out)
    ranks = ranks_from_env(opts.device)
    # One writer at a time (atlas/util/lock.py): rank 0 holds the lock for a torchrun job
    with writer_lock(out, "a build", enabled=ranks.leader):
        check_replaceable(out, overwrite)  # under the lock: it may have just finished an interrupted replacement
        return BuildJob(model, data, out, weights, opts, ranks, log or (lambda s: None)).run(resume, overwrite,
                                                                                           progress)


def check_replaceable(out: Path, overwrite: bool) -> None:
    """--overwrite replaces an atlas or an empty folder, nothing else (a mistyped --out must not delete
    someone's folder): the rule `atlas export` follows for sites."""
    if not out.exists():
        return
    if not overwrite:
        raise AtlasError(f"atlas '{out}' already exists: pass --overwrite to replace it")
    if not out.is_dir():
        raise AtlasError(f"--out '{out}' is a file, not an atlas: --overwrite replaces only an atlas or an "
                         "empty folder")
    if not (out / "manifest.json").is_file():
        inside = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
        if inside:
            shown = ", ".join(inside[:5]) + (f" and {len(inside) - 5} more" if len(inside) > 5 else "")
            raise AtlasError(f"--out '{out}' is not an atlas (it holds {shown}): --overwrite replaces only an "
                             "atlas or an empty folder")


class BuildJob:
    """One build, as stages read top to bottom in `run`: prepare, mine, merge, switches, tables,
    manifest, indexes, publish. The attributes are what the stages share."""

    def __init__(self, model: str, data: str, out: Path, weights: str | None, opts: BuildOptions, ranks,
                 log: Callable[[str], None]):
        self.model_name, self.data, self.out, self.weights = model, data, out, weights
        self.opts, self.ranks, self.log = opts, ranks, log
        self.t_start = time.perf_counter()
        self.staging = out.with_name(out.name + ".partial")
        self.work = self.staging / "work"

    def run(self, resume: bool, overwrite: bool, progress: bool | None) -> Path:
        keep_memory_flat()  # memory must not grow with the number of images (atlas/util/heap.py says why)
        self.resolve(resume)
        self.prepare(resume)
        runs = self.mine(progress)
        if not self.ranks.leader:
            self.ranks.barrier()  # wait for rank 0 to publish
            return self.out
        tops, moms, errors = self.merge()
        rows = top_rows(self.lmap, self.chosen, tops)
        t_sw = time.perf_counter()
        if self.opts.switches and self.capture is not None and CapturedSwitches.complete(self.work, self.nchunks):
            _write_captured_switches(self.staging / "switches.parquet", self.lmap, rows, self.work,
                                     self.chunk_size, self.opts.batch_size)
        elif self.opts.switches:
            _write_switches(self.staging / "switches.parquet", self.lmap, rows, self.inputs, self.opts.batch_size,
                            self.opts.precision)
        t_sw = time.perf_counter() - t_sw
        t_wr = time.perf_counter()
        self.write(errors, moms, rows)
        t_wr = time.perf_counter() - t_wr
        manifest = self.manifest(errors, runs, {"switches_s": round(t_sw, 3), "write_s": round(t_wr, 3)})
        if self.plan is not None:
            build_indexes(self.staging, self.plan.layers, chunks=ChunkVectors(self.work, self.nchunks),
                          locked=True, log=self.log)
        shutil.rmtree(self.work)
        publish_dir(self.staging, self.out, overwrite=overwrite)
        self.ranks.barrier()
        self.report(errors, manifest)
        return self.out

    def resolve(self, resume: bool) -> None:
        """The model, dataset, decoder, preprocessing, layers and chunks this build works with."""
        opts = self.opts
        dev = resolve_device(opts.device)
        if dev.type == "cuda" and self.ranks.active:
            dev = torch.device("cuda", self.ranks.local_rank)
        self.dev = dev
        # a name, a spec (timm:NAME, FILE.py:FACTORY, package.module:FACTORY) or an nn.Module from Python
        self.net = load_model(self.model_name, self.weights, seed=opts.seed,
                              **contrast_norm_option(self.model_name, opts.contrast_norm))
        self.model_name = self.net.atlas_meta["name"]  # a module's: its class's qualified name
        self.source = source = open_dataset(self.data)
        self.decoder = _decoder(opts.decode, source, dev, self.ranks, self.work if resume else None)
        self.pre = pre = preprocessing_for(self.model_name, opts.image_size, opts.mean, opts.std, model=self.net)
        self.lmap = LayerMap(self.net, int(pre["crop"]))
        self.chosen = self.lmap.resolve(opts.layers, kinds=("conv",))
        if any(la.kind != "conv" for la in self.chosen):
            raise AtlasError("build records conv layers; fully connected layers are indexed by `atlas index`")
        self.names = [la.name for la in self.chosen]
        self.n = n = len(source)
        self.plan = plan_for_build(self.lmap, self.names, opts.index_layers, opts.activations, n) \
            if opts.index else None
        self.chunk_size = opts.chunk_size or opts.batch_size * max(1, 1024 // opts.batch_size)
        self.nchunks = (n + self.chunk_size - 1) // self.chunk_size
        self.memory_format = _memory_format(self.work if resume else None, dev)
        self.colour_sample = colour_sample(n, int(pre["crop"]))
        self.options = opts.record(layers=self.names, chunk_size=self.chunk_size, decode=self.decoder,
                                   memory_format=self.memory_format,
                                   index_layers=self.plan.layers if self.plan else None)

    def prepare(self, resume: bool) -> None:
        """The staging folder, prepared by one process (the others learn its verdict)."""
        # What a resumed build must agree on: what changes what the chunks hold. Not the device, the
        # decoding workers or the switches (made after mining); image_size and contrast_norm count by
        # their effect (the preprocessing, the model's options), not by how they were asked for.
        config = {**{k: v for k, v in self.options.items()
                     if k not in ("device", "workers", "switches", "image_size", "contrast_norm")},
                  "format_version": FORMAT_VERSION, "model": self.model_name,
                  "model_kwargs": self.net.atlas_meta["kwargs"], "weights_sha256": self.net.atlas_meta["weights_sha256"],
                  "dataset": str(self.source.root.resolve()), "images": self.n, "preprocessing": self.pre,
                  "index": self.plan.config() if self.plan else None}
        error = None
        if self.ranks.leader:
            try:
                _prepare_staging(self.staging, self.out, config, resume)
            except AtlasError as e:
                error = str(e)
        error = self.ranks.share(error)
        if error:
            raise AtlasError(error)
        self.net = self.net.to(self.dev)
        self.channels_last = self.memory_format == "channels_last"
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)

        workers = self.opts.workers if self.opts.workers is not None else input_workers(self.dev)
        self.inputs = InputBatches(self.source, Preprocess(self.pre), self.dev, self.decoder, workers,
                                   channels_last=self.channels_last)

    def mine(self, progress: bool | None) -> list[dict[str, Any]]:
        """Every chunk not done yet (this rank's share of them); returns the record of runs (rank 0)."""
        n, size, work = self.n, self.chunk_size, self.work
        done = [c for c in range(self.nchunks) if (work / f"chunk-{c:05d}.npz").is_file()]
        todo = [c for c in sorted(set(range(self.nchunks)) - set(done)) if self.ranks.owns(c)]
        if done:
            self.log(f"resuming: {len(done)} of {self.nchunks} chunks already done")
        self.capture = self._capture(done)
        images_in = lambda chunks: sum(min(size, n - c * size) for c in chunks)  # noqa: E731
        n_done = n - images_in(todo) if self.ranks.active else images_in(done)
        t = time.perf_counter()
        with Progress(n, "build", "images", enabled=progress if self.ranks.leader else False,
                      initial=n_done) as bar:
            if self.dev.type == "cpu" and self.opts.precision == "fp32" and cpu_bf16_kernels() and \
                    images_in(todo) >= PROBE_MIN_BATCHES * self.opts.batch_size:
                self.inputs.probe_bf16 = True  # _mine_chunks measures it on one batch
            _mine_chunks(self.lmap, self.chosen, self.inputs, n, todo, size, self.opts, work, bar, self.plan,
                         self.capture, self.channels_last, ColourSample(self.colour_sample, self.inputs.pre))
        self.ranks.barrier()  # every chunk is on disk
        t = time.perf_counter() - t  # after the barrier: the job's mining, every rank's chunks
        return _record_run(work, n - images_in(done), t) if self.ranks.leader else []

    def _capture(self, done: list[int]) -> SwitchCapture | None:
        """The one-pass switch capture (atlas/capture.py), when its rule picks it and every finished chunk
        was captured too; None: the switches take a second pass after the merge."""
        if not (self.opts.switches and one_pass_wins(self.chosen, self.opts.k, self.n)):
            return None
        if not all(capture_file(self.work, c).is_file() for c in done):
            return None
        cap = SwitchCapture(self.lmap, self.chosen, self.opts.k, self.work, self.chunk_size,
                            owned_done=[c for c in done if self.ranks.owns(c)], dev=self.inputs.dev)
        for c in done:
            with np.load(self.work / f"chunk-{c:05d}.npz") as st:
                cap.seed({name: TopK.from_state({f: st[f"{name}.topk.{f}"] for f in ("values", "ids", "pos")})
                          for name in self.names})
        return cap

    def _switch_passes(self) -> int | None:
        """1: captured while mining (atlas/capture.py); 2: a second pass after the merge."""
        if not self.opts.switches:
            return None
        return 1 if self.capture is not None and CapturedSwitches.complete(self.work, self.nchunks) else 2

    def merge(self) -> tuple[dict[str, TopK], dict[str, Moments], dict[int, str]]:
        """The chunks' partial states, merged in chunk order (see the module docstring)."""
        k = self.opts.k
        tops = {la.name: TopK(la.channels, k) for la in self.chosen}
        moms = {la.name: Moments(la.channels) for la in self.chosen}
        errors: dict[int, str] = {}
        self.digests: dict[int, str] = {}
        self.colour_pixels: dict[int, np.ndarray] | None = {}
        for c in range(self.nchunks):
            with np.load(self.work / f"chunk-{c:05d}.npz") as st:
                if "colour.ids" in st.files and self.colour_pixels is not None:
                    self.colour_pixels.update(zip(st["colour.ids"].tolist(), st["colour.pixels"]))
                else:  # a chunk mined before the colour sample was kept: the sample is read again
                    self.colour_pixels = None
                for name in self.names:
                    tops[name].merge(TopK.from_state({f: st[f"{name}.topk.{f}"] for f in ("values", "ids", "pos")}))
                    moms[name].merge(Moments.from_state({f: st[f"{name}.mom.{f}"]
                                                         for f in ("count", "sum", "sumsq", "fires", "max")}))
                errors.update({int(i): e for i, e in json.loads(str(st["errors"])).items()})
                if "digests" in st.files:  # a chunk mined by a release before content hashes has none
                    self.digests.update({int(i): d for i, d in json.loads(str(st["digests"])).items()})
        if len(errors) == self.n:  # nothing to show: no atlas, and no staging folder left behind to resume
            shutil.rmtree(self.staging, ignore_errors=True)
            first = next(iter(sorted(errors.items())))
            raise AtlasError(f"no image of dataset '{self.data}' could be read ({self.n} tried; the first, "
                             f"'{self.source.records[first[0]].path}': {first[1]})")
        return tops, moms, errors

    def write(self, errors: dict[int, str], moms, rows) -> None:
        """The tables, the activations and the conv weights (projections need no other file)."""
        write_tables(self.staging, self.source, errors, self.lmap, self.chosen, moms, rows, self.digests)
        if self.opts.activations:
            _compact_activations(self.staging, self.work, self.names, self.nchunks)
        # A 2012-2014 chain rebuilt by name: its `features`' weights (features.pt, as atlases always had:
        # every conv is in there). Anything else, the whole state (state.pt): a graph may have convs outside
        # `features` (SqueezeNet's classifier, a timm stem), and code rebuilt from a file must not depend
        # on the weights file still being there.
        if self.lmap.chain and self.net.atlas_meta.get("source", "atlas") in ("atlas", "torchvision"):
            kept, file = self.net.features.state_dict(), "features.pt"
        else:
            kept, file = self.net.state_dict(), "state.pt"
        state = {key: v.detach().cpu().contiguous() for key, v in kept.items()}
        torch_save_atomic(self.staging / "model" / file, state)

    def manifest(self, errors: dict[int, str], runs, timings: dict[str, float]) -> dict[str, Any]:
        net, source, weights = self.net, self.source, self.weights
        manifest = {
            "format_version": FORMAT_VERSION,
            "tool": {"name": "atlas", "version": __version__, "torch": torch.__version__},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {**model_record(net), "weights": str(Path(weights).resolve()) if weights else None,
                      "weights_sha256": net.atlas_meta["weights_sha256"],
                      "random_init": net.atlas_meta["random_init"], "seed": self.opts.seed,
                      "num_classes": self.lmap.classes(), "classes": net.atlas_meta.get("classes")},
            "dataset": {**source.describe(), "root": str(source.root.resolve()), "ok": self.n - len(errors),
                        "errors": len(errors)},
            "preprocessing": self.pre,
            "k": self.opts.k,
            "layers": [{**la.to_row(), "pools_below": la.pools_below} for la in self.chosen],
            "geometry": self.lmap.describe(),
            "switches": {"stored": self.opts.switches, "passes": self._switch_passes(),
                         "capture_peak_mb": round(self.capture.peak_bytes / 2**20, 1) if self.capture else None,
                         "encoding": "receptive-field boxes, window offsets "
                         "dy*k+dx, nibble-packed when k*k <= 16 (atlas/deconv/switches.py)"},
            "activations": self.opts.activations,
            # the dataset's colour correlation, for feature visualization's decorrelated colour
            "colour": self._colour(errors),
            "options": {**self.options, "device": str(self.dev), "ranks": self.ranks.world},
            "timings": {**timings, "total_s": round(time.perf_counter() - self.t_start, 3),
                        **_mining_timings(runs)},
        }
        atomic_write_json(self.staging / "manifest.json", manifest)
        return manifest

    def _colour(self, errors: dict[int, str]) -> dict[str, Any]:
        from ..pictures.visualizations import estimate_colour

        if self.colour_pixels is not None:  # kept by the mining pass: no image is read again
            ok = sorted(i for i in self.colour_pixels if i not in errors)
            # the kept pixels are already every stride-th one: estimate_colour takes them all (side 64)
            return estimate_colour(ok, lambda i: Image.fromarray(self.colour_pixels[i]), 64)
        pre = Preprocess(self.pre)

        def crop(i: int):
            try:
                return pre.crop_image(self.source.open_image(i))
            except Exception:  # noqa: BLE001 - an image unreadable now counts as missing from the sample
                return None

        ok = [r.image_id for r in self.source.records if r.image_id not in errors]
        return estimate_colour(ok, crop, int(self.pre["crop"]))

    def report(self, errors: dict[int, str], manifest: dict[str, Any]) -> None:
        """The build's last lines: what was written, and which images could not be read."""
        log, out = self.log, self.out
        log(f"atlas written to {out}: {self.n - len(errors)} images ({len(errors)} unreadable), "
            f"{len(self.names)} layers, k={self.opts.k}, {manifest['timings']['total_s']:.1f} s")
        # after the work: a failed build says one line
        hint = bf16_hint(self.dev, self.opts.precision, getattr(self.inputs, "bf16_speedup", None))
        if hint:
            log(hint)
        from ..store.manifest import random_weights  # the one loud line; at the end, so a refusal stays one line

        if random_weights(manifest["model"]):
            log(f"{random_weights(manifest['model'])}: pass --weights FILE for a trained one")
        if not errors:
            return
        for image_id, why in sorted(errors.items())[:UNREADABLE_SHOWN]:
            log(f"  unreadable: {self.source.records[image_id].path}: {why}")
        more = f" (and {len(errors) - UNREADABLE_SHOWN} more)" if len(errors) > UNREADABLE_SHOWN else ""
        log(f"  all of them{more}: atlas sql {out} \"SELECT image_id, path, error FROM images "
            "WHERE status = 'error'\"")


class ChunkMiner:
    """Mines batches into one chunk's partial state (top-k, moments, activation rows)."""

    def __init__(self, lmap: LayerMap, chosen, k: int, dev: torch.device, precision: str = "fp32",
                 activations: bool = True, chunk: int = 0, plan: MinerPlan | None = None,
                 batch_size: int | None = None, capture: SwitchCapture | None = None,
                 channels_last: bool | None = None, colour: ColourSample | None = None):
        self.capture, self.colour = capture, colour
        self.colour_kept: dict[int, np.ndarray] = {}
        # the atlas's layout (device.recorded_memory_format); None: a GPU's, as before it was recorded
        self.channels_last = dev.type == "cuda" if channels_last is None else channels_last
        if capture is not None:
            capture.start(chunk)
        self.lmap, self.names, self.dev, self.chunk = lmap, [la.name for la in chosen], dev, chunk
        self.batch_size = batch_size  # every batch computed at this size (LayerMap.extract says why)
        self.autocast = precision == "bf16"
        self.keep_activations = activations
        self.errors: dict[int, str] = {}
        self.digests: dict[int, str] = {}  # images.content_hash
        self.acts: dict[str, list] = {m: [] for m in self.names}
        self.tops = {la.name: TopK(la.channels, k, dev) for la in chosen}
        self.moms = {la.name: Moments(la.channels, dev) for la in chosen}
        # For the similarity indexes: per-image vectors of plan.vectors, and the profile sample's conv maxima.
        self.kept: dict[str, list] = {f"images.{m}": [] for m in (plan.vectors if plan else [])}
        self.fc_names = [m for m in (plan.vectors if plan else []) if lmap.by_name[m].kind == "fc"]
        self.sample = None if plan is None or plan.sample is None else torch.as_tensor(plan.sample, device=dev)
        if self.sample is not None:
            self.kept.update({f"sample.{m}": [] for m in self.names})

    def add(self, x: torch.Tensor, ids: torch.Tensor, errs: list[str] | None = None,
            digests: list[str] | None = None) -> None:
        """One batch. Nothing here waits for the device (no copies back per batch): the chunk's rows stay
        on it until `host()`, so the loader's next batch is queued while this one computes."""
        errs = errs or [""] * len(ids)
        for i, e, d in zip(ids.tolist(), errs, digests or [""] * len(ids)):
            if e:
                self.errors[i] = e
            elif d:
                self.digests[i] = d
        if self.colour is not None:
            self.colour_kept.update(self.colour.keep(x, ids, errs))
        x = x.to(self.dev, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            self.lmap.check_trace(x)  # the first batch: the trace computes what the model computes
            with torch.autocast(self.dev.type, torch.bfloat16, enabled=self.autocast):
                feats = self.lmap.extract(x, self.names + self.fc_names, batch_size=self.batch_size,
                                          pool_indices=self.capture is not None)
            if self.capture is not None:
                feats, pool_idx = feats
                maxima = {}
            ids = ids.to(self.dev, non_blocking=True)
            ok = None if not any(errs) else torch.tensor([not e for e in errs], device=self.dev)
            vid = ids if ok is None else ids[ok]
            for name in self.names:
                v, p = spatial_max(feats[name])
                if ok is not None:
                    v, p = v[ok], p[ok]
                if self.capture is not None:
                    maxima[name] = (v, p)
                self.tops[name].update(v, vid, p)
                self.moms[name].update(v)
                if self.keep_activations:
                    self.acts[name].append((vid, v))
                if f"images.{name}" in self.kept:
                    self.kept[f"images.{name}"].append((vid, v))
                if self.sample is not None:
                    s = torch.isin(vid, self.sample)
                    self.kept[f"sample.{name}"].append((vid[s], v[s]))
            for name in self.fc_names:
                f = feats[name] if ok is None else feats[name][ok]
                self.kept[f"images.{name}"].append((vid, layer_vectors("fc", f)))
            if self.capture is not None:
                self.capture.add(maxima, vid, pool_idx, None if ok is None else torch.nonzero(ok).view(-1))

    def host(self) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, list]]:
        """The chunk's activation rows {layer: (ids, values (images, channels))} and kept vectors, on the
        host: one copy per layer and chunk."""
        def cat(parts):
            if not parts:
                return np.zeros(0, np.int32), np.zeros((0, 0), np.float32)
            return torch.cat([p[0] for p in parts]).cpu().numpy(), torch.cat([p[1] for p in parts]).cpu().numpy()

        acts = {name: cat(parts) for name, parts in self.acts.items()} if self.keep_activations else {}
        kept = {key: [cat(parts)] if parts else [] for key, parts in self.kept.items()}
        return acts, kept


def _decoder(decode: str, source, dev: torch.device, ranks, resumed: Path | None) -> str:
    """The decoder of this build (atlas.data.inputs): one for every rank, and with --decode auto a resumed
    build's own (`resumed`: its work folder)."""
    started = None
    if decode == "auto" and resumed is not None and (resumed / "config.json").is_file():
        try:  # builds from before --decode decoded with PIL
            started = json.loads((resumed / "config.json").read_text()).get("decode", "cpu")
            decode = started
        except (OSError, ValueError):
            pass  # _prepare_staging says what is wrong with it
    try:
        mine, why = choose_decoder(decode, source, dev), None
    except AtlasError as e:
        mine, why = None, f"this build was started with --decode {started}; {e}" if started else str(e)
    lead, lead_why = ranks.share((mine, why))  # every rank reaches this, whatever it found
    if lead_why:
        raise AtlasError(lead_why)
    if why:
        raise AtlasError(f"rank {ranks.rank}: {why}")
    if lead == "device" and mine != "device":
        raise AtlasError(f"rank {ranks.rank}: rank 0 decodes JPEGs on its device and this rank cannot; "
                         "pass --decode cpu")
    return lead  # a rank that could decode on its device follows rank 0 to the CPU


def colour_sample(n: int, side: int) -> dict[int, int]:
    """The images whose pixels give the manifest's colour statistics (visualizations.estimate_colour's
    sample, evenly spaced over every image: the readable ones are known only after mining), with the
    stride that keeps at most 64 x 64 pixels of each."""
    from ..pictures.visualizations import COLOUR_SAMPLE

    ids = range(n) if n <= COLOUR_SAMPLE else [(i * n) // COLOUR_SAMPLE for i in range(COLOUR_SAMPLE)]
    return {i: max(1, side // 64) for i in ids}


class ColourSample:
    """Keeps the colour sample's pixels as the mining pass sees them, so that no image is decoded again
    for the manifest's colour statistics. The model's input is (pixel / 255 - mean) / std of a uint8
    crop: undone and rounded, it gives those uint8 pixels back exactly."""

    def __init__(self, sample: dict[int, int], pre: Preprocess):
        self.sample = sample
        self.mean, self.std = (t.numpy().reshape(1, 1, 1, 3) for t in (pre.mean, pre.std))

    def keep(self, x: torch.Tensor, ids: torch.Tensor, errs: list[str]) -> dict[int, np.ndarray]:
        rows = [(j, i) for j, i in enumerate(ids.tolist()) if i in self.sample and not errs[j]]
        if not rows:
            return {}
        st = self.sample[rows[0][1]]  # one stride for every image of a build
        # numpy, in this thread: torch would run these few small ops as parallel regions, each waiting
        # for both threads, one of whose cores a decoding worker holds (14 ms a batch, 0.9 s a build of
        # 4,096 images); (N, H, W, 3) in one copy
        sel = [j for j, _ in rows]
        if x.device.type == "cpu":  # the workers' batch: only the kept pixels are copied
            px = x.detach().float().permute(0, 2, 3, 1).numpy()[sel, ::st, ::st]
        else:
            px = x[sel, :, ::st, ::st].detach().float().permute(0, 2, 3, 1).cpu().numpy()
        px = np.clip(np.round((px * self.std + self.mean) * np.float32(255.0)), 0, 255).astype(np.uint8)
        return {i: px[n] for n, (_, i) in enumerate(rows)}


def _memory_format(resumed: Path | None, dev: torch.device) -> str:
    """channels-last (device.MEMORY_FORMATS says why), or a resumed build's own layout."""
    if resumed is not None and (resumed / "config.json").is_file():
        try:  # a work folder's config has no device: this build's, for one started before layouts were recorded
            return recorded_memory_format({"device": str(dev), **json.loads((resumed / "config.json").read_text())})
        except (OSError, ValueError):
            pass  # _prepare_staging says what is wrong with it
    return "channels_last"


def _prepare_staging(staging: Path, out: Path, config: dict, resume: bool) -> None:
    work = staging / "work"
    if staging.exists():
        cfg_file = work / "config.json"
        if not resume:
            raise AtlasError(f"an interrupted build of '{out}' is in '{staging}': continue it with --resume "
                             "(or delete that folder to start over)")
        remove_temp_files(staging)  # what the interrupted run was writing; under the lock, nobody else is
        # a build started before --decode existed decoded with PIL
        # and in the layout BuildJob.resolve gave it (_memory_format)
        old = {"decode": "cpu", "memory_format": config["memory_format"], **json.loads(cfg_file.read_text())} \
            if cfg_file.is_file() else None
        if old is not None and old.get("format_version") != config["format_version"]:
            raise AtlasError(f"cannot resume '{staging}': it was started by an older atlas (format "
                             f"{old.get('format_version')}); delete that folder to start over")
        if old is not None and old != config:
            diff = sorted(key for key in config if old.get(key) != config[key])
            raise AtlasError(f"cannot resume '{staging}': it was started with other options ({', '.join(diff)})")
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / "config.json", config)


def _mine_chunks(lmap: LayerMap, chosen, inputs: InputBatches, n: int, todo, chunk_size, opts: BuildOptions,
                 work: Path, bar: Progress, plan: MinerPlan | None = None,
                 capture: SwitchCapture | None = None, channels_last: bool | None = None,
                 colour: ColourSample | None = None) -> None:
    layout = chunk_batches(n, chunk_size, opts.batch_size, todo)
    if not layout:
        return
    owner, batches = [c for c, _ in layout], [ids for _, ids in layout]
    miner = None
    for bi, (x, ids, errs, digests) in enumerate(inputs(batches)):
        if miner is None or miner.chunk != owner[bi]:
            if miner is not None:
                _flush_chunk(miner, work)
            miner = ChunkMiner(lmap, chosen, opts.k, inputs.dev, opts.precision, opts.activations,
                               chunk=owner[bi], plan=plan, batch_size=opts.batch_size, capture=capture,
                               channels_last=channels_last, colour=colour)
        t = time.perf_counter()
        with inputs.computing():  # both passes timed alike, the decoding threads waiting
            miner.add(x, ids, list(errs), list(digests))
            if bi == PROBE_BATCH and getattr(inputs, "probe_bf16", False):
                inputs.bf16_speedup = bf16_speedup(lmap, miner.names, x, opts.batch_size, miner.channels_last,
                                                   time.perf_counter() - t)
        bar.update(len(errs))
    _flush_chunk(miner, work)


def bf16_speedup(lmap: LayerMap, names: list[str], x: torch.Tensor, batch_size: int, channels_last: bool,
                 fp32_s: float) -> float:
    """How much faster the mining forward pass of batch `x` runs in bf16 than it did in fp32 (`fp32_s`:
    the miner's whole batch, so the figure errs low)."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        lmap.extract(x, names, batch_size=batch_size)
        t = time.perf_counter()
        lmap.extract(x, names, batch_size=batch_size)
        return fp32_s / max(time.perf_counter() - t, 1e-9)


def _flush_chunk(miner: ChunkMiner, work: Path) -> None:
    c = miner.chunk
    acts, kept = miner.host()
    for name, (ids, vals) in acts.items():
        nimg, nch = vals.shape
        table = pa.table({
            "image_id": pa.array(np.repeat(ids.astype(np.int32), nch), pa.int32()),
            "channel": pa.array(np.tile(np.arange(nch, dtype=np.int16), nimg), pa.int16()),
            "value": pa.array(vals.reshape(-1).astype(np.float32), pa.float32()),
        })
        # a work file, read once by _compact_activations: lz4, faster to write than zstd and about as small
        atomic_write_parquet(work / f"act-{c:05d}-{name}.parquet", table, compression="lz4")
    if kept:  # before the chunk file: its presence is what marks the chunk done
        atomic_write(work / f"vec-{c:05d}.npz", lambda tmp: _savez(tmp, vector_arrays(kept)))
    if miner.capture is not None:  # before the chunk file, as the vectors
        miner.capture.finish()
    arrays = {"errors": np.array(json.dumps({str(i): e for i, e in miner.errors.items()})),
              "digests": np.array(json.dumps({str(i): d for i, d in miner.digests.items()}))}
    if miner.colour is not None:
        kept = sorted(miner.colour_kept)
        arrays["colour.ids"] = np.array(kept, np.int64)
        arrays["colour.pixels"] = np.stack([miner.colour_kept[i] for i in kept]) if kept else \
            np.zeros((0, 1, 1, 3), np.uint8)
    for name, t in miner.tops.items():
        arrays.update({f"{name}.topk.{f}": v for f, v in t.state().items()})
        arrays.update({f"{name}.mom.{f}": v for f, v in miner.moms[name].state().items()})
    atomic_write(work / f"chunk-{c:05d}.npz", lambda tmp: _savez(tmp, arrays))


def _savez(path: Path, arrays: dict) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _write_switches(path: Path, lmap: LayerMap, top_rows, inputs: InputBatches, batch_size,
                    precision: str = "fp32") -> None:
    """Second pass over the final top-k images only: their pool switches inside the units' fields.

    Decoded by the same input pipeline as the mining pass (workers, device decoder), in its layout (the
    atlas's: its kernels, its numbers), batch by batch in the order write_switches asks for them."""
    regions = switch_regions(lmap, top_rows)
    # the model runs only as far as the deepest pool any unit's switches need: zfnet's conv5 units need
    # pool1 and pool2, so conv3-5 (~45 % of its conv work) are skipped
    deepest = max({pool for r in regions.values() for pool in r}, key=lambda p: lmap.pool_by_name[p].index,
                  default=None)
    image_ids = list(regions)
    batches = inputs([image_ids[b:b + batch_size] for b in range(0, len(image_ids), batch_size)])

    def forward(chunk: list[int]) -> dict[tuple[int, str], np.ndarray]:
        x, ids, _, _ = next(batches)
        assert ids.tolist() == chunk, "switches batches out of step with write_switches"
        # the precision of the mining pass: the switches are those of the activations the ranking saw
        with inputs.computing(), torch.inference_mode(), \
                torch.autocast(inputs.dev.type, torch.bfloat16, enabled=precision == "bf16"):
            _, sw = lmap.extract(x, [deepest], pool_indices=True, batch_size=batch_size)
        return {(i, pool): window_codes(sw[pool][j, :, reg.y0:reg.y0 + reg.h, reg.x0:reg.x0 + reg.w],
                                        lmap.pool_by_name[pool].geometry, origin=(reg.y0, reg.x0))
                for j, i in enumerate(chunk) for pool, reg in regions[i].items()}

    write_switches(path, lmap, regions, forward, batch_size)


def _write_captured_switches(path: Path, lmap: LayerMap, top_rows, work: Path, chunk_size: int,
                             batch_size: int) -> None:
    """switches.parquet from the mining pass's captures (atlas/capture.py), cropped to the final boxes."""
    regions = switch_regions(lmap, top_rows)
    captured = CapturedSwitches(lmap, work, chunk_size)
    try:
        write_switches(path, lmap, regions, lambda chunk: {(i, pool): captured(i, reg) for i in chunk
                                                           for pool, reg in regions[i].items()}, batch_size,
                       compress_aside=True)
    finally:
        captured.close()


def _record_run(work: Path, mined: int, seconds: float) -> list[dict[str, Any]]:
    """Append this run's mining (images, seconds) to the build's record of runs; returns every run.

    A resumed build reports its throughput over the work each run actually did: a run that found
    every chunk done mined nothing and says so, rather than turning the whole build into 0 images/s.
    (A run killed while mining leaves no record; its finished chunks count as done for the next.)
    """
    path = work / "runs.json"
    try:
        runs = json.loads(path.read_text()) if path.is_file() else []
    except ValueError:
        runs = []
    runs.append({"images": int(mined), "mining_s": round(seconds, 3),
                 "images_per_s": round(mined / seconds, 2) if mined and seconds > 0 else None})
    atomic_write_json(path, runs)
    return runs


def _mining_timings(runs: list[dict[str, Any]]) -> dict[str, Any]:
    images = sum(r["images"] for r in runs)
    seconds = sum(r["mining_s"] for r in runs)
    out = {"mining_s": round(seconds, 3), "images_per_s": round(images / seconds, 2) if images and seconds > 0
           else None}
    if len(runs) > 1:
        out.update({"resumed": True, "runs": runs})
    return out


def _compact_activations(staging: Path, work: Path, names: list[str], nchunks: int) -> None:
    """One file per layer from the chunk parts, streamed (memory stays flat)."""
    for name in names:
        parts = (pq.read_table(work / f"act-{c:05d}-{name}.parquet") for c in range(nchunks))
        write_activations(staging / "activations" / f"layer={name}" / "part-0.parquet", parts)
