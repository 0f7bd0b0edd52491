"""`train`: one run of the recipe from options to RUN_DIR/final.pt (see atlas/train/__init__.py)."""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..data import open_dataset
from ..device import default_workers, resolve_device
from ..errors import AtlasError
from ..fsutil import atomic_write_json, remove_temp_files
from ..lock import holds_writer_lock
from ..models.registry import build_model, constructor_options, contrast_norm_option, model_names
from ..models.zfnet import paper_init
from ..progress import Progress
from .checkpoints import CHECKPOINT_FORMAT, save_weights, torch_save_atomic, write_metrics
from .curves import plot_curves
from .pipeline import MEMORY_LIMIT, Batches, crop_flip
from .recipe import (MODEL_DEFAULTS, PAPER_DEFAULTS, check_options, differences, epoch_augmentation, holdout_split,
                     mix, parse_epochs, run_preprocessing)
from .trainer import Trainer, flush_denormal


@holds_writer_lock("a training run")
def train(model: str, data: str | os.PathLike, out: str | os.PathLike, *, val: str | os.PathLike | None = None,
          epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
          momentum: float = 0.9, weight_decay: float = 5e-4, dropout: float | None = None, init: str | None = None,
          renorm_radius: float = 0.1, lr_patience: int = 3, lr_factor: float = 0.1,
          resize: int | None = None, crop: int | None = None, flip: bool = True, ten_crop_eval: bool = False,
          val_fraction: float = 0.1, snapshot_epochs: str | Iterable[int] | None = None,
          resume: bool = False, overwrite: bool = False, device: str = "auto", workers: int | None = None,
          precision: str = "auto", in_memory: bool | None = None, memory_limit: int = MEMORY_LIMIT,
          seed: int = 0, image_size: int | None = None, contrast_norm: bool | None = None,
          progress: bool | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Train `model` (a registry name) on the labelled images of `data`; returns RUN_DIR/final.pt.

    Options left as None take the model's defaults (MODEL_DEFAULTS) or the paper's (PAPER_DEFAULTS);
    the values used are written to RUN_DIR/config.json. See the module docstring for the recipe,
    the files written, and what `resume` guarantees.
    """
    log = log or (lambda s: None)
    t_start = time.perf_counter()
    out = Path(out)
    if model not in model_names():
        raise AtlasError(f"unknown model '{model}': choose one of {', '.join(model_names())}")
    md = {**PAPER_DEFAULTS, **MODEL_DEFAULTS.get(model, {})}
    dev = resolve_device(device)
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    pre = run_preprocessing(model, image_size, resize, crop)
    model_options = contrast_norm_option(model, contrast_norm)
    default_norm = constructor_options(model).get("contrast_norm")
    opts: dict[str, Any] = {
        "model": model, "epochs": int(epochs if epochs is not None else md["epochs"]),
        "batch_size": int(batch_size if batch_size is not None else md["batch_size"]),
        "lr": float(lr if lr is not None else md["lr"]), "momentum": float(momentum),
        "weight_decay": float(weight_decay), "dropout": float(dropout if dropout is not None else md["dropout"]),
        "init": init if init is not None else md["init"], "renorm_radius": float(renorm_radius or 0.0),
        "lr_patience": int(lr_patience), "lr_factor": float(lr_factor),
        "resize": pre["resize"], "crop": pre["crop"], "flip": bool(flip), "ten_crop_eval": bool(ten_crop_eval),
        "val_fraction": float(val_fraction), "snapshot_epochs": parse_epochs(snapshot_epochs),
        "precision": precision, "seed": int(seed), "image_size": image_size,
        "contrast_norm": model_options.get("contrast_norm", default_norm),
    }
    check_options(opts)

    # -- data ------------------------------------------------------------------
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
        vsource = open_dataset(val)
        if vsource.classes != classes:
            vc = vsource.classes or []
            only_t = [c for c in classes if c not in vc]
            only_v = [c for c in vc if c not in classes]
            why = (f"only in '{data}': {', '.join(only_t[:5]) or '-'}; only in '{val}': {', '.join(only_v[:5]) or '-'}"
                   if (only_t or only_v) else "same names in another order")
            raise AtlasError(f"validation classes of '{val}' differ from the training classes of '{data}' ({why})")
        train_ids = list(range(len(source)))
        val_ids = list(range(len(vsource)))
        validation = {"kind": "folder", "path": str(vsource.root.resolve()), "images": len(val_ids)}
    else:
        vsource = source
        train_ids, val_ids = holdout_split([r.label_index for r in source.records], opts["val_fraction"], seed)
        validation = {"kind": "holdout", "fraction": opts["val_fraction"], "seed": int(seed),
                      "stratified": True, "images": len(val_ids),
                      "note": f"a fixed, seeded {opts['val_fraction']:.0%} of the training data per class, "
                              "held out (atlas.train.holdout_split)"}
    if not val_ids:
        raise AtlasError(f"dataset '{data}' is too small to hold out validation images: pass --val")
    config = {
        "model": model, "data": str(data), "data_root": str(source.root.resolve()),
        "train_images": len(train_ids), "classes": classes, "validation": validation,
        "options": opts, "preprocessing": pre,
        "defaults": {"paper": PAPER_DEFAULTS, "model": MODEL_DEFAULTS.get(model, {}),
                     "weight_decay_note": "not stated in the paper; 5e-4 is AlexNet's"},
    }
    # The options that define the run (compared on --resume): the options plus what the data is.
    identity = {**opts, "data": config["data_root"], "train_images": len(train_ids), "classes": classes,
                "validation": {k: v for k, v in validation.items() if k != "note"}}

    # -- the run folder ----------------------------------------------------------
    ckpt_path, cfg_path = out / "checkpoint.pt", out / "config.json"
    checkpoint = None
    if cfg_path.exists() or ckpt_path.exists():
        if resume:
            if cfg_path.exists():
                old = json.loads(cfg_path.read_text())
                # a run from before --contrast-norm had the model's own
                old_id = {"contrast_norm": default_norm, **old.get("options", {}), "data": old.get("data_root"),
                          "train_images": old.get("train_images"), "classes": old.get("classes"),
                          "validation": {k: v for k, v in (old.get("validation") or {}).items() if k != "note"}}
                diff = differences(old_id, identity)
                if diff:
                    raise AtlasError(f"cannot resume '{out}' with different options: {'; '.join(diff)}")
            if ckpt_path.exists():
                try:
                    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
                except Exception as e:
                    raise AtlasError(f"checkpoint '{ckpt_path}' is not readable ({type(e).__name__})") from None
                if checkpoint.get("epoch", 0) > opts["epochs"]:
                    raise AtlasError(f"run '{out}' has already trained {checkpoint['epoch']} epochs: "
                                     f"--epochs {opts['epochs']} is fewer")
        elif overwrite:
            shutil.rmtree(out)
        else:
            raise AtlasError(f"run folder '{out}' already holds a training run: pass --resume to continue it "
                             "or --overwrite to start again")
    elif resume:
        log(f"no checkpoint in '{out}': starting a new run")
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        remove_temp_files(out)  # a killed run's half-written checkpoint or snapshot (under the lock)
    channels_last = dev.type == "cuda"
    nworkers = workers if workers is not None else default_workers(dev)
    need = (len(train_ids) + len(val_ids)) * 3 * pre["resize"] ** 2
    keep = in_memory if in_memory is not None else need <= memory_limit
    config["runtime"] = {"device": str(dev), "channels_last": channels_last, "workers": nworkers,
                         "in_memory": bool(keep), "torch": torch.__version__,
                         "deterministic_note": "bit-identical on CPU given the seed, resumed or not"}
    atomic_write_json(cfg_path, config)

    # -- model and optimizer -------------------------------------------------------
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_model(model, num_classes=len(classes), dropout=opts["dropout"], **model_options)
        if opts["init"] == "paper":
            paper_init(net)
    net = net.to(dev)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=opts["lr"], momentum=opts["momentum"],
                          weight_decay=opts["weight_decay"])
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=opts["lr_factor"],
                                                       patience=opts["lr_patience"])
    history: list[dict[str, Any]] = []
    start = 1
    if checkpoint is not None:
        net.load_state_dict(checkpoint["model_state"])
        opt.load_state_dict(checkpoint["optimizer_state"])
        sched.load_state_dict(checkpoint["scheduler_state"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if dev.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            try:
                torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], dev)
            except RuntimeError:
                pass
        history = list(checkpoint["history"])
        start = int(checkpoint["epoch"]) + 1
        log(f"resuming '{out}' after epoch {start - 1}")

    # model_kwargs: every constructor option, so that load_model (and an atlas) rebuilds this very net
    meta_base = {"model": model, "model_kwargs": net.atlas_kwargs, "num_classes": len(classes),
                 "classes": classes, "preprocessing": pre,
                 "init": opts["init"], "seed": int(seed), "dataset": config["data_root"], "trained_by": "atlas train"}

    # -- data in memory or streamed ---------------------------------------------------
    labels_t = torch.tensor([source.records[i].label_index for i in train_ids], dtype=torch.long)
    vlabels_t = torch.tensor([vsource.records[i].label_index for i in val_ids], dtype=torch.long)
    if start <= opts["epochs"]:
        tb = Batches(source, train_ids, labels_t, pre["resize"], keep, dev, nworkers, progress, "decode train")
        vb = Batches(vsource, val_ids, vlabels_t, pre["resize"], keep, dev, nworkers, progress, "decode val")
        if tb.bad() or vb.bad():
            log(f"{tb.bad() + vb.bad()} unreadable image(s) are left out of training and validation")
        trainer = Trainer(net, opt, dev, pre, precision, channels_last, opts["renorm_radius"])
        if 0 in opts["snapshot_epochs"] and start == 1:
            save_weights(out / "snapshots" / "epoch-000.pt", net, {**meta_base, "epochs": 0, "epoch": 0})
        n = len(train_ids)
        r, c = pre["resize"], pre["crop"]
        net.train()
        with Progress(opts["epochs"] * n, "train", "images", enabled=progress, initial=(start - 1) * n) as bar, \
                flush_denormal(dev.type == "cpu"):
            for epoch in range(start, opts["epochs"] + 1):
                t0 = time.perf_counter()
                torch.manual_seed(mix(seed, epoch, 2))  # dropout: a function of (seed, epoch)
                order, oy, ox, fl = epoch_augmentation(seed, epoch, n, r, c, opts["flip"])
                loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
                correct = torch.zeros((), dtype=torch.long, device=dev)
                n_bad = 0
                for xb, yb, okb, idx, bad in tb.iterate(order, opts["batch_size"]):
                    xb = crop_flip(xb, oy[idx], ox[idx], fl[idx], c)
                    ls, cr = trainer.step(trainer.normalize(xb), yb, okb)
                    loss_sum += ls
                    correct += cr
                    n_bad += bad
                    bar.update(len(idx))
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t_train = time.perf_counter() - t0
                if n_bad and not keep and epoch == start:
                    log(f"{n_bad} unreadable training image(s) are left out of the loss")
                n_ok = max(n - n_bad, 1)
                row = {"epoch": epoch, "lr": float(opt.param_groups[0]["lr"]),
                       "train_loss": float(loss_sum) / n_ok, "train_top1_error": 1.0 - int(correct) / n_ok}
                row.update(trainer.evaluate(vb, max(opts["batch_size"], 64), opts["ten_crop_eval"]))
                row["images_per_s"] = n / t_train if t_train > 0 else 0.0
                row["train_seconds"] = t_train
                sched.step(row["val_top1_error"])
                row["epoch_seconds"] = time.perf_counter() - t0
                if not math.isfinite(row["train_loss"]):
                    raise AtlasError(f"training diverged in epoch {epoch} (loss {row['train_loss']}): "
                                     f"lower --lr (now {opts['lr']:g})")
                history.append(row)
                if epoch in opts["snapshot_epochs"]:
                    save_weights(out / "snapshots" / f"epoch-{epoch:03d}.pt", net,
                                  {**meta_base, "epochs": epoch, "epoch": epoch,
                                   "val_top1_error": row["val_top1_error"]})
                torch_save_atomic(ckpt_path, {
                    "format": CHECKPOINT_FORMAT, "epoch": epoch,
                    "model_state": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                    "optimizer_state": opt.state_dict(), "scheduler_state": sched.state_dict(),
                    "rng": {"torch": torch.get_rng_state(),
                            "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None},
                    "data_order": {"seed": int(seed), "next_epoch": epoch + 1,
                                   "scheme": "epoch e: randperm and crops from SeedSequence(seed, e, 1); "
                                             "dropout RNG reseeded from (seed, e, 2)"},
                    "history": history})
                write_metrics(out / "metrics.csv", history)
                log(f"epoch {epoch}/{opts['epochs']}: train loss {row['train_loss']:.3f}, "
                    f"val top-1 error {row['val_top1_error']:.1%}, top-5 {row['val_top5_error']:.1%}, "
                    f"lr {row['lr']:g}, {row['images_per_s']:.0f} images/s")
    else:
        log(f"run '{out}' is already complete ({start - 1} epochs)")
        write_metrics(out / "metrics.csv", history)

    final = out / "final.pt"
    last = history[-1] if history else {}
    save_weights(final, net, {**meta_base, "epochs": len(history),
                               "val_top1_error": last.get("val_top1_error"),
                               "val_top5_error": last.get("val_top5_error")})
    if history:
        plot_curves(history, out / "curves.png", title=f"{model} on {Path(str(data)).name}")
    log(f"trained {model} for {len(history)} epochs in {time.perf_counter() - t_start:.0f} s: {final}")
    return final
