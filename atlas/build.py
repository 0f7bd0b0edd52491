"""The build job: stream a dataset through a model once and write an atlas.

Plumbing only; the statistics live in `mining`, the switch encoding in
`switches`, the table layout in `store`.

How it survives interruption: images are processed in fixed chunks. Each
finished chunk leaves its partial top-k, moments and activation rows in
`ATLAS.partial/work/`, written atomically. `--resume` skips finished chunks;
the final merge runs over chunk files in chunk order, so a resumed build gives
the same bytes as an uninterrupted one. Only a complete atlas is renamed to
ATLAS.

Similarity indexes (`atlas.similarity`) are built in the staging folder before
it is published: conv layers from the activations table, fc layers (fc7) from
the vectors each chunk keeps in `work/vec-CCCCC.npz` (float16: the classifier
is cheap next to the convs, and no second pass is needed).
"""
from __future__ import annotations

import datetime as _dt
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import FORMAT_VERSION, __version__
from .distributed import ranks_from_env
from .data import Preprocess, open_dataset
from .device import default_workers, resolve_device
from .errors import AtlasError
from .heap import keep_memory_flat
from .inputs import InputBatches, choose_decoder, chunk_batches
from .lock import writer_lock
from .fsutil import (atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_parquet, publish_dir,
                     remove_temp_files)
from .layers import LayerMap
from .mining import NO_IMAGE, Moments, TopK, spatial_max
from .models.registry import contrast_norm_option, load_model, model_record, preprocessing_for
from .progress import Progress
from .similarity import ChunkVectors, MinerPlan, build_indexes, layer_vectors, plan_for_build, vector_arrays
from .switches import pack, regions_below, union, window_codes

# Row groups (scripts/bench_scale.py measures both on a 1M-image atlas):
# images.parquet: a channel's top-k joins its k images, and DuckDB pushes their ids into the scan, skipping
# every row group whose image_id range holds none; small groups keep that lookup flat in the number of images.
IMAGE_ROW_GROUP = 1 << 14
# activations: whole-layer scans (class selectivity, the export's histograms) want big groups (fewer, better
# compressed pages); a lookup of a few images still skips by the image_id statistics.
ACT_ROW_GROUP = 1 << 20


def build(model: str, data: str, out: str | Path, *, weights: str | None = None, k: int = 9,
          layers: str | list[str] | None = None, batch_size: int = 64, device: str = "auto",
          workers: int | None = None, activations: bool = True, switches: bool = True,
          resume: bool = False, overwrite: bool = False, image_size: int | None = None,
          chunk_size: int | None = None, precision: str = "fp32", decode: str = "auto", seed: int = 0,
          index: bool = True,
          index_layers: str | list[str] | None = None, contrast_norm: bool | None = None,
          progress: bool | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Run the build job; returns the path of the published atlas."""
    log = log or (lambda s: None)
    t_start = time.perf_counter()
    keep_memory_flat()  # memory must not grow with the number of images (atlas/heap.py says why)
    out = Path(out)
    for name, value, least in (("--k", k, 1), ("--batch-size", batch_size, 1), ("--chunk-size", chunk_size, 1),
                               ("--workers", workers, 0)):
        if value is not None and value < least:
            raise AtlasError(f"{name} must be at least {least} (got {value})")
    if precision not in ("fp32", "bf16"):
        raise AtlasError(f"unknown precision '{precision}': use fp32 or bf16")
    check_replaceable(out, overwrite)
    ranks = ranks_from_env(device)
    # One writer at a time (atlas/lock.py): rank 0 holds the lock for a torchrun job
    with writer_lock(out, "a build", enabled=ranks.leader):
        return _build(model, data, out, weights=weights, k=k, layers=layers, batch_size=batch_size, device=device,
                      workers=workers, activations=activations, switches=switches, resume=resume,
                      overwrite=overwrite, image_size=image_size, chunk_size=chunk_size, precision=precision,
                      decode=decode, seed=seed, index=index, index_layers=index_layers,
                      contrast_norm=contrast_norm, progress=progress, log=log, ranks=ranks, t_start=t_start)


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


def _build(model, data, out: Path, *, weights, k, layers, batch_size, device, workers, activations, switches,
           resume, overwrite, image_size, chunk_size, precision, decode, seed, index, index_layers, contrast_norm,
           progress, log, ranks, t_start) -> Path:
    """The build under its writer lock (build() checks the options first)."""
    dev = resolve_device(device)
    if dev.type == "cuda" and ranks.active:
        dev = torch.device("cuda", ranks.local_rank)
    net = load_model(model, weights, seed=seed, **contrast_norm_option(model, contrast_norm))
    source = open_dataset(data)
    staging = out.with_name(out.name + ".partial")
    work = staging / "work"
    decoder = _decoder(decode, source, dev, ranks, work if resume else None)
    pre = net.atlas_meta.get("preprocessing") or preprocessing_for(model, image_size)
    if image_size and image_size != pre["crop"]:
        pre = preprocessing_for(model, image_size)
    lmap = LayerMap(net, int(pre["crop"]))
    chosen = lmap.resolve(layers, kinds=("conv",))
    if any(la.kind != "conv" for la in chosen):
        raise AtlasError("build records conv layers; fully connected layers are indexed by `atlas index`")
    names = [la.name for la in chosen]
    n = len(source)
    plan = plan_for_build(lmap, names, index_layers, activations, n) if index else None
    chunk_size = chunk_size or batch_size * max(1, 1024 // batch_size)
    nchunks = (n + chunk_size - 1) // chunk_size

    config = {
        "format_version": FORMAT_VERSION, "model": model, "model_kwargs": net.atlas_meta["kwargs"],
        "weights_sha256": net.atlas_meta["weights_sha256"],
        "seed": seed, "dataset": str(source.root.resolve()), "images": n, "preprocessing": pre, "k": k,
        "layers": names, "batch_size": batch_size, "chunk_size": chunk_size, "activations": activations,
        "switches": switches, "precision": precision, "decode": decoder, "index": plan.config() if plan else None,
    }
    error = None
    if ranks.leader:  # one process prepares the staging folder; the others learn its verdict
        try:
            _prepare_staging(staging, out, config, resume)
        except AtlasError as e:
            error = str(e)
    error = ranks.share(error)
    if error:
        raise AtlasError(error)

    net = net.to(dev)
    if dev.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    inputs = InputBatches(source, Preprocess(pre), dev, decoder,
                          workers if workers is not None else default_workers(dev))
    done = [c for c in range(nchunks) if (work / f"chunk-{c:05d}.npz").is_file()]
    todo = [c for c in range(nchunks) if c not in set(done) and ranks.owns(c)]
    if done:
        log(f"resuming: {len(done)} of {nchunks} chunks already done")
    n_done = sum(min(chunk_size, n - c * chunk_size) for c in done)

    t_fwd = time.perf_counter()
    if ranks.active:
        n_done = n - sum(min(chunk_size, n - c * chunk_size) for c in todo)
        progress = progress if ranks.leader else False
    with Progress(n, "build", "images", enabled=progress, initial=n_done) as bar:
        _mine_chunks(lmap, chosen, inputs, n, todo, chunk_size, batch_size, k, dev, precision, work,
                     activations, bar, plan)
    ranks.barrier()  # every chunk is on disk
    t_fwd = time.perf_counter() - t_fwd  # after the barrier: the job's mining, every rank's chunks
    if not ranks.leader:
        ranks.barrier()  # wait for rank 0 to publish
        return out
    runs = _record_run(work, n - sum(min(chunk_size, n - c * chunk_size) for c in done), t_fwd)

    # Merge partial states in chunk order (see the module docstring).
    tops = {la.name: TopK(la.channels, k) for la in chosen}
    moms = {la.name: Moments(la.channels) for la in chosen}
    errors: dict[int, str] = {}
    for c in range(nchunks):
        with np.load(work / f"chunk-{c:05d}.npz") as st:
            for name in names:
                tops[name].merge(TopK.from_state({f: st[f"{name}.topk.{f}"] for f in ("values", "ids", "pos")}))
                moms[name].merge(Moments.from_state({f: st[f"{name}.mom.{f}"]
                                                     for f in ("count", "sum", "sumsq", "fires", "max")}))
            errors.update({int(i): e for i, e in json.loads(str(st["errors"])).items()})
    if len(errors) == n:  # nothing to show: no atlas, and no staging folder left behind to resume
        shutil.rmtree(staging, ignore_errors=True)
        first = next(iter(sorted(errors.items())))
        raise AtlasError(f"no image of dataset '{data}' could be read ({n} tried; the first, "
                         f"'{source.records[first[0]].path}': {first[1]})")
    top_rows = _top_rows(lmap, chosen, tops)

    t_sw = time.perf_counter()
    if switches:
        _write_switches(staging / "switches.parquet", lmap, top_rows, inputs, batch_size)
    t_sw = time.perf_counter() - t_sw

    t_wr = time.perf_counter()
    _write_tables(staging, source, errors, lmap, chosen, moms, top_rows)
    if activations:
        _compact_activations(staging, work, names, nchunks)
    (staging / "model").mkdir(exist_ok=True)
    state = {key: v.detach().cpu().contiguous() for key, v in net.features.state_dict().items()}
    buf = io.BytesIO()  # torch.save names the archive after the file: a temp name would change the bytes
    torch.save(state, buf)
    atomic_write_bytes(staging / "model" / "features.pt", buf.getvalue())
    t_wr = time.perf_counter() - t_wr

    n_ok = n - len(errors)
    manifest = {
        "format_version": FORMAT_VERSION,
        "tool": {"name": "atlas", "version": __version__, "torch": torch.__version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {**model_record(net), "weights": str(Path(weights).resolve()) if weights else None,
                  "weights_sha256": net.atlas_meta["weights_sha256"], "random_init": net.atlas_meta["random_init"],
                  "seed": seed, "num_classes": lmap.classes(), "classes": net.atlas_meta.get("classes")},
        "dataset": {**source.describe(), "root": str(source.root.resolve()), "ok": n_ok, "errors": len(errors)},
        "preprocessing": pre,
        "k": k,
        "layers": [{**la.to_row(), "pools_below": la.pools_below} for la in chosen],
        "geometry": lmap.describe(),
        "switches": {"stored": switches, "encoding": "receptive-field boxes, window offsets dy*k+dx, "
                                                    "nibble-packed when k*k <= 16 (atlas/switches.py)"},
        "activations": activations,
        "options": {"batch_size": batch_size, "chunk_size": chunk_size, "device": str(dev), "precision": precision,
                    "decode": decoder,
                    "ranks": ranks.world},
        "timings": {"switches_s": round(t_sw, 3), "write_s": round(t_wr, 3),
                    "total_s": round(time.perf_counter() - t_start, 3), **_mining_timings(runs)},
    }
    atomic_write_json(staging / "manifest.json", manifest)
    if plan is not None:
        build_indexes(staging, plan.layers, chunks=ChunkVectors(work, nchunks), locked=True, log=log)
    shutil.rmtree(work)
    publish_dir(staging, out, overwrite=overwrite)
    ranks.barrier()
    log(f"atlas written to {out}: {n_ok} images ({len(errors)} unreadable), {len(names)} layers, k={k}, "
        f"{manifest['timings']['total_s']:.1f} s")
    if errors:
        for image_id, why in sorted(errors.items())[:UNREADABLE_SHOWN]:
            log(f"  unreadable: {source.records[image_id].path}: {why}")
        more = f" (and {len(errors) - UNREADABLE_SHOWN} more)" if len(errors) > UNREADABLE_SHOWN else ""
        log(f"  all of them{more}: atlas sql {out} \"SELECT image_id, path, error FROM images "
            "WHERE status = 'error'\"")
    return out


UNREADABLE_SHOWN = 5  # the build's last lines name this many unreadable images


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


class ChunkMiner:
    """Mines batches into one chunk's partial state (top-k, moments, activation rows)."""

    def __init__(self, lmap: LayerMap, chosen, k: int, dev: torch.device, precision: str = "fp32",
                 activations: bool = True, chunk: int = 0, plan: MinerPlan | None = None,
                 batch_size: int | None = None):
        self.lmap, self.names, self.dev, self.chunk = lmap, [la.name for la in chosen], dev, chunk
        self.batch_size = batch_size  # every batch computed at this size (LayerMap.extract says why)
        self.autocast = precision == "bf16"
        self.keep_activations = activations
        self.errors: dict[int, str] = {}
        self.acts: dict[str, list] = {m: [] for m in self.names}
        self.tops = {la.name: TopK(la.channels, k, dev) for la in chosen}
        self.moms = {la.name: Moments(la.channels, dev) for la in chosen}
        # For the similarity indexes: per-image vectors of plan.vectors, and the profile sample's conv maxima.
        self.kept: dict[str, list] = {f"images.{m}": [] for m in (plan.vectors if plan else [])}
        self.fc_names = [m for m in (plan.vectors if plan else []) if lmap.by_name[m].kind == "fc"]
        self.sample = None if plan is None or plan.sample is None else torch.as_tensor(plan.sample, device=dev)
        if self.sample is not None:
            self.kept.update({f"sample.{m}": [] for m in self.names})

    def add(self, x: torch.Tensor, ids: torch.Tensor, errs: list[str] | None = None) -> None:
        """One batch. Nothing here waits for the device (no copies back per batch): the chunk's rows stay
        on it until `host()`, so the loader's next batch is queued while this one computes."""
        errs = errs or [""] * len(ids)
        for i, e in zip(ids.tolist(), errs):
            if e:
                self.errors[i] = e
        x = x.to(self.dev, non_blocking=True)
        if self.dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            with torch.autocast(self.dev.type, torch.bfloat16, enabled=self.autocast):
                feats = self.lmap.extract(x, self.names + self.fc_names, batch_size=self.batch_size)
            ids = ids.to(self.dev, non_blocking=True)
            ok = None if not any(errs) else torch.tensor([not e for e in errs], device=self.dev)
            vid = ids if ok is None else ids[ok]
            for name in self.names:
                v, p = spatial_max(feats[name].float())
                if ok is not None:
                    v, p = v[ok], p[ok]
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
    """The decoder of this build (atlas.inputs): one for every rank, and with --decode auto a resumed
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


def _prepare_staging(staging: Path, out: Path, config: dict, resume: bool) -> None:
    work = staging / "work"
    if staging.exists():
        cfg_file = work / "config.json"
        if not resume:
            raise AtlasError(f"an interrupted build of '{out}' is in '{staging}': continue it with --resume "
                             "(or delete that folder to start over)")
        remove_temp_files(staging)  # what the interrupted run was writing; under the lock, nobody else is
        # a build started before --decode existed decoded with PIL
        old = {"decode": "cpu", **json.loads(cfg_file.read_text())} if cfg_file.is_file() else None
        if old is not None and old != config:
            diff = sorted(key for key in config if old.get(key) != config[key])
            raise AtlasError(f"cannot resume '{staging}': it was started with other options ({', '.join(diff)})")
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / "config.json", config)


def _mine_chunks(lmap: LayerMap, chosen, inputs: InputBatches, n: int, todo, chunk_size, batch_size, k, dev,
                 precision, work: Path, activations: bool, bar: Progress, plan: MinerPlan | None = None) -> None:
    layout = chunk_batches(n, chunk_size, batch_size, todo)
    if not layout:
        return
    owner, batches = [c for c, _ in layout], [ids for _, ids in layout]
    miner = None
    for bi, (x, ids, errs) in enumerate(inputs(batches)):
        if miner is None or miner.chunk != owner[bi]:
            if miner is not None:
                _flush_chunk(miner, work)
            miner = ChunkMiner(lmap, chosen, k, dev, precision, activations, chunk=owner[bi], plan=plan,
                               batch_size=batch_size)
        miner.add(x, ids, list(errs))
        bar.update(len(errs))
    _flush_chunk(miner, work)


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
        atomic_write_parquet(work / f"act-{c:05d}-{name}.parquet", table, compression="zstd")
    if kept:  # before the chunk file: its presence is what marks the chunk done
        atomic_write(work / f"vec-{c:05d}.npz", lambda tmp: _savez(tmp, vector_arrays(kept)))
    arrays = {"errors": np.array(json.dumps({str(i): e for i, e in miner.errors.items()}))}
    for name, t in miner.tops.items():
        arrays.update({f"{name}.topk.{f}": v for f, v in t.state().items()})
        arrays.update({f"{name}.mom.{f}": v for f, v in miner.moms[name].state().items()})
    atomic_write(work / f"chunk-{c:05d}.npz", lambda tmp: _savez(tmp, arrays))


def _savez(path: Path, arrays: dict) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _top_rows(lmap: LayerMap, chosen, tops: dict[str, TopK]) -> list[dict[str, Any]]:
    rows = []
    size = lmap.image_size
    for la in chosen:
        st = tops[la.name].state()
        for ch in range(la.channels):
            for rank in range(st["values"].shape[1]):
                image_id = int(st["ids"][ch, rank])
                if image_id == NO_IMAGE:
                    break
                y, x = divmod(int(st["pos"][ch, rank]), la.width)
                x0, y0, x1, y1 = la.box(y, x, size)
                rows.append({"layer": la.name, "channel": ch, "rank": rank, "image_id": image_id,
                             "value": float(st["values"][ch, rank]), "y": y, "x": x,
                             "x0": x0, "y0": y0, "x1": x1, "y1": y1})
    return rows


SWITCH_SCHEMA = pa.schema([("image_id", pa.int32()), ("pool", pa.string()), ("y0", pa.int32()), ("x0", pa.int32()),
                           ("h", pa.int32()), ("w", pa.int32()), ("data", pa.binary())])


def switch_regions(lmap: LayerMap, top_rows) -> dict[int, dict[str, Any]]:
    """image id -> pool -> the box of the pool's output that the image's top-k units reach (the union of
    their receptive fields there), in image order: what the switches pass records."""
    needed: dict[int, dict[str, list]] = {}
    for r in top_rows:
        for reg in regions_below(lmap, lmap.by_name[r["layer"]], r["y"], r["x"]):
            needed.setdefault(r["image_id"], {}).setdefault(reg.pool, []).append(reg)
    return {i: {pool: union(regs) for pool, regs in sorted(needed[i].items())} for i in sorted(needed)}


def write_switches(path: Path, lmap: LayerMap, regions: dict[int, dict[str, Any]],
                   codes: Callable[[list[int]], dict[tuple[int, str], np.ndarray]], batch_size: int) -> None:
    """switches.parquet from `regions` (see switch_regions), `codes(image_ids)` giving a batch's window
    codes per (image id, pool) inside its region.

    Streamed a batch of images at a time: an image's switches can take ~170 KB (zfnet's pool1 under a
    conv5 unit), and up to channels x k images have some, so holding them all would make memory grow
    with the dataset. One row group per batch, in image order, so that a reader asking for a few
    images skips the rest by the row groups' image_id statistics. scripts/make_large_atlas.py writes
    through this too.
    """
    image_ids = list(regions)

    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, SWITCH_SCHEMA, compression="zstd") as writer:
            for b in range(0, len(image_ids), batch_size):
                chunk = image_ids[b:b + batch_size]
                got = codes(chunk)
                cols: dict[str, list] = {c: [] for c in SWITCH_SCHEMA.names}
                for image_id in chunk:
                    for pool, reg in regions[image_id].items():
                        data = pack(got[(image_id, pool)], lmap.pool_by_name[pool].geometry.kernel)
                        for key, v in (("image_id", image_id), ("pool", pool), ("y0", reg.y0), ("x0", reg.x0),
                                       ("h", reg.h), ("w", reg.w), ("data", data)):
                            cols[key].append(v)
                writer.write_table(pa.table(cols, schema=SWITCH_SCHEMA))

    atomic_write(path, write)


def _write_switches(path: Path, lmap: LayerMap, top_rows, inputs: InputBatches, batch_size) -> None:
    """Second pass over the final top-k images only: their pool switches inside the units' fields.

    Decoded by the same input pipeline as the mining pass (workers, device decoder), batch by batch in
    the order write_switches asks for them."""
    regions = switch_regions(lmap, top_rows)
    # the model runs only as far as the deepest pool any unit's switches need: zfnet's conv5 units need
    # pool1 and pool2, so conv3-5 (~45 % of its conv work) are skipped
    deepest = max({pool for r in regions.values() for pool in r}, key=lambda p: lmap.pool_by_name[p].index,
                  default=None)
    image_ids = list(regions)
    batches = inputs([image_ids[b:b + batch_size] for b in range(0, len(image_ids), batch_size)])

    def forward(chunk: list[int]) -> dict[tuple[int, str], np.ndarray]:
        x, ids, _ = next(batches)
        assert ids.tolist() == chunk, "switches batches out of step with write_switches"
        if inputs.dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            _, sw = lmap.extract(x, [deepest], pool_indices=True, batch_size=batch_size)
        return {(i, pool): window_codes(sw[pool][j, :, reg.y0:reg.y0 + reg.h, reg.x0:reg.x0 + reg.w],
                                        lmap.pool_by_name[pool].geometry, origin=(reg.y0, reg.x0))
                for j, i in enumerate(chunk) for pool, reg in regions[i].items()}

    write_switches(path, lmap, regions, forward, batch_size)


def _write_tables(staging: Path, source, errors: dict[int, str], lmap, chosen, moms, top_rows) -> None:
    recs = source.records
    atomic_write_parquet(staging / "images.parquet", pa.table({
        "image_id": pa.array([r.image_id for r in recs], pa.int32()),
        "path": pa.array([r.path for r in recs], pa.string()),
        "label": pa.array([r.label for r in recs], pa.string()),
        "label_index": pa.array([r.label_index for r in recs], pa.int32()),
        "status": pa.array(["error" if r.image_id in errors else "ok" for r in recs], pa.string()),
        "error": pa.array([errors.get(r.image_id) for r in recs], pa.string()),
    }), row_group_size=IMAGE_ROW_GROUP)
    layer_rows = [la.to_row() for la in chosen]
    atomic_write_parquet(staging / "layers.parquet", pa.Table.from_pylist(layer_rows, schema=pa.schema([
        ("layer", pa.string()), ("kind", pa.string()), ("channels", pa.int32()), ("height", pa.int32()),
        ("width", pa.int32()), ("kernel", pa.int32()), ("stride", pa.int32()), ("padding", pa.int32()),
        ("rf_size", pa.int32()), ("jump", pa.int32()), ("offset", pa.int32())])))
    ch_cols: dict[str, list] = {c: [] for c in ("layer", "channel", "mean", "std", "max", "fire_rate")}
    for la in chosen:
        s = moms[la.name].summary()
        ch_cols["layer"] += [la.name] * la.channels
        ch_cols["channel"] += list(range(la.channels))
        for f in ("mean", "std", "max", "fire_rate"):
            ch_cols[f] += [float(v) if np.isfinite(v) else None for v in s[f]]
    atomic_write_parquet(staging / "channels.parquet", pa.table(ch_cols, schema=pa.schema([
        ("layer", pa.string()), ("channel", pa.int32()), ("mean", pa.float64()), ("std", pa.float64()),
        ("max", pa.float64()), ("fire_rate", pa.float64())])))
    atomic_write_parquet(staging / "top_activations.parquet", pa.Table.from_pylist(top_rows, schema=pa.schema([
        ("layer", pa.string()), ("channel", pa.int32()), ("rank", pa.int32()), ("image_id", pa.int32()),
        ("value", pa.float32()), ("y", pa.int32()), ("x", pa.int32()), ("x0", pa.int32()), ("y0", pa.int32()),
        ("x1", pa.int32()), ("y1", pa.int32())])))


def _compact_activations(staging: Path, work: Path, names: list[str], nchunks: int) -> None:
    """One file per layer from the chunk parts, streamed (memory stays flat)."""
    for name in names:
        parts = (pq.read_table(work / f"act-{c:05d}-{name}.parquet") for c in range(nchunks))
        write_activations(staging / "activations" / f"layer={name}" / "part-0.parquet", parts)


def write_activations(target: Path, tables) -> None:
    """A layer's activations file from tables of (image_id, channel, value) rows in image order, in row
    groups of ACT_ROW_GROUP rows whatever size the tables come in (a build's chunk parts hold 1024 images),
    streamed and published atomically. scripts/make_large_atlas.py writes through this too."""

    def write(tmp: Path) -> None:
        writer, pending, n = None, [], 0
        try:
            for table in tables:
                if writer is None:
                    # value: split into byte streams, the exponents of similar floats compress (zstd) ~17 %
                    # smaller and scan faster than a dictionary that overflows into plain pages
                    writer = pq.ParquetWriter(tmp, table.schema, compression="zstd",
                                              use_dictionary=["image_id", "channel"],
                                              column_encoding={"value": "BYTE_STREAM_SPLIT"})
                pending.append(table)
                n += table.num_rows
                while n >= ACT_ROW_GROUP:
                    buf = pa.concat_tables(pending)
                    writer.write_table(buf.slice(0, ACT_ROW_GROUP), row_group_size=ACT_ROW_GROUP)
                    pending, n = [buf.slice(ACT_ROW_GROUP)], n - ACT_ROW_GROUP
            if writer is not None and n:
                writer.write_table(pa.concat_tables(pending), row_group_size=ACT_ROW_GROUP)
        finally:
            if writer is not None:
                writer.close()

    atomic_write(target, write)
