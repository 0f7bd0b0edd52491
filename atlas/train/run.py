"""`train`: one run of the recipe, from options to RUN_DIR/final.pt, as stages read top to bottom in
`TrainRun.run` (see atlas/train/__init__.py for the recipe and why a resumed run is exact)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..data import open_dataset
from ..util.device import default_workers, resolve_device
from ..errors import AtlasError
from ..util.files import atomic_write_json, remove_temp_files, torch_save_atomic
from ..util.lock import holds_writer_lock
from ..models.registry import build_model, constructor_options, contrast_norm_option, family, trainable_names
from ..models.zfnet import paper_init
from ..util.progress import Progress
from .checkpoints import CHECKPOINT_FORMAT, save_weights, write_metrics
from .curves import plot_curves
from .pipeline import MEMORY_LIMIT, Batches, crop_flip
from .recipe import (BATCHNORM_DEFAULTS, MODEL_DEFAULTS, PAPER_DEFAULTS, check_options, differences, epoch_augmentation, holdout_split,
                     mix, parse_epochs, run_preprocessing)
from .trainer import Trainer, flush_denormal


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """Every option of a run but where it reads and writes (model, data, val, out) and how it goes (resume,
    overwrite, progress). None takes the model's default (MODEL_DEFAULTS) or the paper's (PAPER_DEFAULTS);
    `resolve` gives the values used, checked once, as config.json records them and --resume compares them.
    `atlas train`'s flags are these fields (tests/test_cli_vocabulary.py checks it)."""

    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dropout: float | None = None
    init: str | None = None
    renorm_radius: float | None = None
    lr_patience: int = 3
    lr_factor: float = 0.1
    resize: int | None = None
    crop: int | None = None
    flip: bool = True
    ten_crop_eval: bool = False
    val_fraction: float = 0.1
    snapshot_epochs: str | Iterable[int] | None = None
    device: str = "auto"
    workers: int | None = None
    precision: str = "auto"
    in_memory: bool | None = None
    memory_limit: int = MEMORY_LIMIT
    seed: int = 0
    image_size: int | None = None
    contrast_norm: bool | None = None

    def resolve(self, model: str, dev: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the run's options with every default filled in and checked, the preprocessing)."""
        if model not in trainable_names():
            raise AtlasError(f"unknown model '{model}': choose one of {', '.join(trainable_names())}")
        fam = family(model)
        md = {**PAPER_DEFAULTS, **(BATCHNORM_DEFAULTS if fam["batchnorm"] else {}), **MODEL_DEFAULTS.get(model, {})}
        pick = lambda name: getattr(self, name) if getattr(self, name) is not None else md[name]  # noqa: E731
        if self.dropout is not None and not fam["dropout"]:
            raise AtlasError(f"--dropout: model '{model}' has no dropout option to set")
        pre = run_preprocessing(model, self.image_size, self.resize, self.crop)
        norm = contrast_norm_option(model, self.contrast_norm)
        opts: dict[str, Any] = {
            "model": model, "epochs": int(pick("epochs")), "batch_size": int(pick("batch_size")),
            "lr": float(pick("lr")), "momentum": float(self.momentum), "weight_decay": float(self.weight_decay),
            "dropout": float(pick("dropout")) if fam["dropout"] else None, "init": pick("init"),
            "renorm_radius": float(pick("renorm_radius")),
            "lr_patience": int(self.lr_patience), "lr_factor": float(self.lr_factor),
            "resize": pre["resize"], "crop": pre["crop"], "flip": bool(self.flip),
            "ten_crop_eval": bool(self.ten_crop_eval), "val_fraction": float(self.val_fraction),
            "snapshot_epochs": parse_epochs(self.snapshot_epochs),
            "precision": self.precision if self.precision != "auto" else ("bf16" if dev.type == "cuda" else "fp32"),
            "seed": int(self.seed), "image_size": self.image_size,
            "contrast_norm": norm.get("contrast_norm", constructor_options(model).get("contrast_norm")),
        }
        check_options(opts)
        return opts, pre


@holds_writer_lock("a training run")
def train(model: str, data: str | os.PathLike, out: str | os.PathLike, *, val: str | os.PathLike | None = None,
          resume: bool = False, overwrite: bool = False, progress: bool | None = None,
          log: Callable[[str], None] | None = None, options: TrainOptions | None = None,
          **option_values: Any) -> Path:
    """Train `model` (a registry name) on the labelled images of `data`; returns RUN_DIR/final.pt.

    The options are a TrainOptions, or its fields as keywords (`epochs=2, batch_size=16`); the values
    used are written to RUN_DIR/config.json."""
    opts = options if options is not None else TrainOptions(**option_values)
    return TrainRun(model, data, val, Path(out), opts, log or (lambda s: None)).run(resume, overwrite, progress)


class TrainRun:
    """One run: options, data, the run folder, the model, the epochs, the final weights."""

    def __init__(self, model: str, data, val, out: Path, options: TrainOptions, log: Callable[[str], None]):
        self.model, self.data, self.val, self.out, self.options, self.log = model, data, val, out, options, log
        self.t_start = time.perf_counter()
        self.dev = resolve_device(options.device)
        self.opts, self.pre = options.resolve(model, self.dev)
        self.ckpt_path, self.cfg_path = out / "checkpoint.pt", out / "config.json"

    def run(self, resume: bool, overwrite: bool, progress: bool | None) -> Path:
        self.load_data()
        checkpoint = self.prepare_folder(resume, overwrite)
        history, start = self.build(checkpoint)
        if start <= self.opts["epochs"]:
            self.train_epochs(start, history, progress)
        else:
            self.log(f"run '{self.out}' is already complete ({start - 1} epochs)")
            write_metrics(self.out / "metrics.csv", history)
        return self.finish(history)

    def load_data(self) -> None:
        """The training and validation images, and what the run records of them."""
        data, val, opts = self.data, self.val, self.opts
        source = open_dataset(data)
        if source.classes is None or any(r.label_index is None for r in source.records):
            raise AtlasError(f"dataset '{data}' has no labels (a flat folder of images): training needs an "
                             "ImageFolder (one sub-folder per class) or CIFAR-10")
        present = sorted({r.label_index for r in source.records})
        if len(source.classes) < 2 or len(present) < 2:
            have = source.classes[present[0]] if present else "none"
            raise AtlasError(f"dataset '{data}' has images of only one class ({have}): training needs at least two")
        classes = list(source.classes)
        if val is not None:
            vsource = _validation_folder(val, data, classes)
            train_ids, val_ids = list(range(len(source))), list(range(len(vsource)))
            validation = {"kind": "folder", "path": str(vsource.root.resolve()), "images": len(val_ids)}
        else:
            vsource = source
            train_ids, val_ids = holdout_split([r.label_index for r in source.records], opts["val_fraction"],
                                               opts["seed"])
            validation = {"kind": "holdout", "fraction": opts["val_fraction"], "seed": opts["seed"],
                          "stratified": True, "images": len(val_ids),
                          "note": f"a fixed, seeded {opts['val_fraction']:.0%} of the training data per class, "
                                  "held out (atlas.train.holdout_split)"}
        if not val_ids:
            raise AtlasError(f"dataset '{data}' is too small to hold out validation images: pass --val")
        self.source, self.vsource, self.classes = source, vsource, classes
        self.train_ids, self.val_ids, self.validation = train_ids, val_ids, validation
        self.config = {
            "model": self.model, "data": str(data), "data_root": str(source.root.resolve()),
            "train_images": len(train_ids), "classes": classes, "validation": validation,
            "options": opts, "preprocessing": self.pre,
            "defaults": {"paper": PAPER_DEFAULTS, "model": MODEL_DEFAULTS.get(self.model, {}),
                         "weight_decay_note": "not stated in the paper; 5e-4 is AlexNet's"},
        }

    def identity(self, config: dict[str, Any]) -> dict[str, Any]:
        """What defines a run, compared on --resume: its options plus what its data is."""
        return {**config.get("options", {}), "data": config.get("data_root"),
                "train_images": config.get("train_images"), "classes": config.get("classes"),
                "validation": {k: v for k, v in (config.get("validation") or {}).items() if k != "note"}}

    def prepare_folder(self, resume: bool, overwrite: bool) -> dict[str, Any] | None:
        """The run folder, checked against a resumed run; returns the checkpoint to continue from."""
        out, checkpoint = self.out, None
        if self.cfg_path.exists() or self.ckpt_path.exists():
            if resume:
                self._check_resumable()
                checkpoint = self._read_checkpoint()
            elif overwrite:
                shutil.rmtree(out)
            else:
                raise AtlasError(f"run folder '{out}' already holds a training run: pass --resume to continue "
                                 "it or --overwrite to start again")
        elif resume:
            self.log(f"no checkpoint in '{out}': starting a new run")
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            remove_temp_files(out)  # a killed run's half-written checkpoint or snapshot (under the lock)
        self.channels_last = self.dev.type == "cuda"
        self.workers = self.options.workers if self.options.workers is not None else default_workers(self.dev)
        need = (len(self.train_ids) + len(self.val_ids)) * 3 * self.pre["resize"] ** 2
        self.in_memory = self.options.in_memory if self.options.in_memory is not None \
            else need <= self.options.memory_limit
        self.config["runtime"] = {"device": str(self.dev), "channels_last": self.channels_last,
                                  "workers": self.workers, "in_memory": bool(self.in_memory),
                                  "torch": torch.__version__,
                                  "deterministic_note": "bit-identical on CPU given the seed, resumed or not"}
        atomic_write_json(self.cfg_path, self.config)
        return checkpoint

    def _check_resumable(self) -> None:
        if not self.cfg_path.exists():
            return
        old = json.loads(self.cfg_path.read_text())
        # a run from before --contrast-norm had the model's own
        old.setdefault("options", {}).setdefault("contrast_norm", constructor_options(self.model).get("contrast_norm"))
        diff = differences(self.identity(old), self.identity(self.config))
        if diff:
            raise AtlasError(f"cannot resume '{self.out}' with different options: {'; '.join(diff)}")

    def _read_checkpoint(self) -> dict[str, Any] | None:
        if not self.ckpt_path.exists():
            return None
        try:
            checkpoint = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise AtlasError(f"checkpoint '{self.ckpt_path}' is not readable ({type(e).__name__})") from None
        if checkpoint.get("epoch", 0) > self.opts["epochs"]:
            raise AtlasError(f"run '{self.out}' has already trained {checkpoint['epoch']} epochs: "
                             f"--epochs {self.opts['epochs']} is fewer")
        return checkpoint

    def build(self, checkpoint: dict[str, Any] | None) -> tuple[list[dict[str, Any]], int]:
        """The model, optimizer and scheduler, from the checkpoint when resuming; returns (history, first
        epoch to run)."""
        opts, dev = self.opts, self.dev
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(opts["seed"])
            dropout = {} if opts["dropout"] is None else {"dropout": opts["dropout"]}
            net = build_model(self.model, num_classes=len(self.classes), **dropout,
                              **contrast_norm_option(self.model, self.options.contrast_norm))
            if opts["init"] == "paper":
                paper_init(net)
        net = net.to(dev)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net
        self.opt = torch.optim.SGD(net.parameters(), lr=opts["lr"], momentum=opts["momentum"],
                                   weight_decay=opts["weight_decay"])
        self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(self.opt, mode="min", factor=opts["lr_factor"],
                                                                patience=opts["lr_patience"])
        # model_kwargs: every constructor option, so that load_model (and an atlas) rebuilds this very net
        self.meta = {"model": self.model, "model_kwargs": net.atlas_kwargs, "num_classes": len(self.classes),
                     "classes": self.classes, "preprocessing": self.pre, "init": opts["init"],
                     "seed": opts["seed"], "dataset": self.config["data_root"], "trained_by": "atlas train"}
        if checkpoint is None:
            return [], 1
        net.load_state_dict(checkpoint["model_state"])
        self.opt.load_state_dict(checkpoint["optimizer_state"])
        self.sched.load_state_dict(checkpoint["scheduler_state"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if dev.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            try:
                torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], dev)
            except RuntimeError:
                pass
        start = int(checkpoint["epoch"]) + 1
        self.log(f"resuming '{self.out}' after epoch {start - 1}")
        return list(checkpoint["history"]), start

    def train_epochs(self, start: int, history: list[dict[str, Any]], progress: bool | None) -> None:
        """Epochs `start`..the last, each followed by its checkpoint, snapshot and metrics."""
        opts, dev, out = self.opts, self.dev, self.out
        label = lambda src, ids: torch.tensor([src.records[i].label_index for i in ids], dtype=torch.long)  # noqa: E731
        self.tb = Batches(self.source, self.train_ids, label(self.source, self.train_ids), self.pre["resize"],
                          self.in_memory, dev, self.workers, progress, "decode train")
        self.vb = Batches(self.vsource, self.val_ids, label(self.vsource, self.val_ids), self.pre["resize"],
                          self.in_memory, dev, self.workers, progress, "decode val")
        if self.tb.bad() or self.vb.bad():
            self.log(f"{self.tb.bad() + self.vb.bad()} unreadable image(s) are left out of training and validation")
        self.trainer = Trainer(self.net, self.opt, dev, self.pre, opts["precision"], self.channels_last,
                               opts["renorm_radius"])
        if 0 in opts["snapshot_epochs"] and start == 1:
            save_weights(out / "snapshots" / "epoch-000.pt", self.net, {**self.meta, "epochs": 0, "epoch": 0})
        n = len(self.train_ids)
        self.net.train()
        with Progress(opts["epochs"] * n, "train", "images", enabled=progress, initial=(start - 1) * n) as bar, \
                flush_denormal(dev.type == "cpu"):
            for epoch in range(start, opts["epochs"] + 1):
                row = self.epoch(epoch, bar, first=epoch == start)
                history.append(row)
                self.save(epoch, row, history)
                self.log(f"epoch {epoch}/{opts['epochs']}: train loss {row['train_loss']:.3f}, "
                         f"val top-1 error {row['val_top1_error']:.1%}, top-5 {row['val_top5_error']:.1%}, "
                         f"lr {row['lr']:g}, {row['images_per_s']:.0f} images/s")

    def epoch(self, epoch: int, bar: Progress, first: bool) -> dict[str, Any]:
        """One epoch of training and its validation: the metrics row."""
        opts, dev, seed = self.opts, self.dev, self.opts["seed"]
        t0 = time.perf_counter()
        n, c = len(self.train_ids), self.pre["crop"]
        torch.manual_seed(mix(seed, epoch, 2))  # dropout: a function of (seed, epoch)
        order, oy, ox, fl = epoch_augmentation(seed, epoch, n, self.pre["resize"], c, opts["flip"])
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        correct = torch.zeros((), dtype=torch.long, device=dev)
        n_bad = 0
        for xb, yb, okb, idx, bad in self.tb.iterate(order, opts["batch_size"]):
            xb = crop_flip(xb, oy[idx], ox[idx], fl[idx], c)
            ls, cr = self.trainer.step(self.trainer.normalize(xb), yb, okb)
            loss_sum += ls
            correct += cr
            n_bad += bad
            bar.update(len(idx))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t_train = time.perf_counter() - t0
        if n_bad and not self.in_memory and first:
            self.log(f"{n_bad} unreadable training image(s) are left out of the loss")
        n_ok = max(n - n_bad, 1)
        row = {"epoch": epoch, "lr": float(self.opt.param_groups[0]["lr"]),
               "train_loss": float(loss_sum) / n_ok, "train_top1_error": 1.0 - int(correct) / n_ok}
        row.update(self.trainer.evaluate(self.vb, max(opts["batch_size"], 64), opts["ten_crop_eval"]))
        row["images_per_s"] = n / t_train if t_train > 0 else 0.0
        row["train_seconds"] = t_train
        self.sched.step(row["val_top1_error"])
        row["epoch_seconds"] = time.perf_counter() - t0
        if not math.isfinite(row["train_loss"]):
            raise AtlasError(f"training diverged in epoch {epoch} (loss {row['train_loss']}): "
                             f"lower --lr (now {opts['lr']:g})")
        return row

    def save(self, epoch: int, row: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """After an epoch: its snapshot if asked for, the checkpoint to resume from, metrics.csv."""
        out, dev, net = self.out, self.dev, self.net
        if epoch in self.opts["snapshot_epochs"]:
            save_weights(out / "snapshots" / f"epoch-{epoch:03d}.pt", net,
                         {**self.meta, "epochs": epoch, "epoch": epoch, "val_top1_error": row["val_top1_error"]})
        torch_save_atomic(self.ckpt_path, {
            "format": CHECKPOINT_FORMAT, "epoch": epoch,
            "model_state": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "optimizer_state": self.opt.state_dict(), "scheduler_state": self.sched.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None},
            "data_order": {"seed": self.opts["seed"], "next_epoch": epoch + 1,
                           "scheme": "epoch e: randperm and crops from SeedSequence(seed, e, 1); "
                                     "dropout RNG reseeded from (seed, e, 2)"},
            "history": history})
        write_metrics(out / "metrics.csv", history)

    def finish(self, history: list[dict[str, Any]]) -> Path:
        """final.pt and curves.png."""
        final = self.out / "final.pt"
        last = history[-1] if history else {}
        save_weights(final, self.net, {**self.meta, "epochs": len(history),
                                       "val_top1_error": last.get("val_top1_error"),
                                       "val_top5_error": last.get("val_top5_error")})
        if history:
            plot_curves(history, self.out / "curves.png", title=f"{self.model} on {Path(str(self.data)).name}")
        self.log(f"trained {self.model} for {len(history)} epochs in {time.perf_counter() - self.t_start:.0f} s: "
                 f"{final}")
        return final


def _validation_folder(val, data, classes: list[str]):
    vsource = open_dataset(val)
    if vsource.classes != classes:
        vc = vsource.classes or []
        only_t = [c for c in classes if c not in vc]
        only_v = [c for c in vc if c not in classes]
        why = (f"only in '{data}': {', '.join(only_t[:5]) or '-'}; only in '{val}': {', '.join(only_v[:5]) or '-'}"
               if (only_t or only_v) else "same names in another order")
        raise AtlasError(f"validation classes of '{val}' differ from the training classes of '{data}' ({why})")
    return vsource
