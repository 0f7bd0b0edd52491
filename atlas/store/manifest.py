"""The manifest of an atlas someone else may have made: every field the tool uses, checked first.

An atlas folder is data: it can come from a colleague, a zip, a bucket, and be edited in a text editor
on the way. `validate` checks the whole manifest against `SCHEMA` (types, ranges, allowed values, and
the shapes of the strings that become parts of paths: digests, layer and pool names) before any other
work, so that a bad value is one line naming its field instead of a traceback deep inside a picture, a
folder name outside the cache, or a huge allocation. Unknown keys are left alone (a newer tool may
record more); the code reads none of them.

Torch-free and small: `atlas sql` and `atlas info` import it.
"""
from __future__ import annotations

import os
import re
from typing import Any

from ..choices import DECODERS
from ..errors import AtlasError
from ..util.schema import BIG, CLASSES_MAX, NAME, Bool, Float, Int, Invalid, List, Obj, OneOf, Str, bad, show

HEX64 = re.compile(r"[0-9a-f]{64}")
SEED_MAX = 2 ** 32 - 1  # numpy's and the samplers' seeds
SIDE_MAX = 8192         # an image side the tool draws, crops or resizes to
CHANNELS_MAX = 1 << 20


LAYER_NAME = Str(NAME, what="a layer name (letters, digits, _ and -, parts joined by single dots)", longest=200)
HEX = Str(HEX64, what="a sha256 digest (64 lower-case hex digits)")
OFFSET = Int(-BIG, BIG, nullable=True)
SIZE = Int(0, BIG, nullable=True)
THREE = List(Float(-1e6, 1e6), 3, 3)
THREE_POSITIVE = List(Float(0, 1e6, positive=True), 3, 3)
# a constructor option's value, as JSON holds one: what a builder may take (registry's allow-lists say which)
OPTION_VALUE = OneOf(Bool(), Int(), Float(), Str(longest=200), List(OneOf(Bool(), Int(), Float()), 0, 16),
                     nullable=True)

LAYER = Obj({"layer": LAYER_NAME, "kind": Str(NAME, what="a layer kind", longest=40),
             "channels": Int(1, CHANNELS_MAX), "height?": SIZE, "width?": SIZE,
             "kernel?": SIZE, "stride?": SIZE, "padding?": OFFSET, "rf_size?": SIZE, "jump?": SIZE,
             "offset?": OFFSET, "pools_below?": List(LAYER_NAME, 0, 1000)})
POOL = Obj({"name": LAYER_NAME, "index?": Int(0, BIG), "channels": Int(1, CHANNELS_MAX), "ceil_mode?": Bool(),
            "kernel": Int(1, 1024), "stride": Int(1, 1024), "padding": Int(0, 1024), "rf_size?": SIZE,
            "jump?": SIZE, "offset?": OFFSET, "in_size?": SIZE, "out_size?": SIZE})
PREPROCESSING = Obj({"crop": Int(1, SIDE_MAX), "resize": Int(1, SIDE_MAX), "mean": THREE,
                     "std": THREE_POSITIVE, "note?": Str(nullable=True)})
MODEL = Obj({
    "name": Str(what="a model name", longest=300),
    "source?": Str(choices=("atlas", "torchvision", "timm", "file", "module", "object"), nullable=True),
    "kwargs?": Obj({}, nullable=True, values=OPTION_VALUE),
    "weights?": Str(nullable=True), "weights_sha256?": Str(HEX64, what="a sha256 digest (64 lower-case hex "
                                                                       "digits)", nullable=True),
    "random_init?": Bool(nullable=True), "seed?": Int(0, SEED_MAX),
    "num_classes?": Int(1, CLASSES_MAX, nullable=True), "classes?": List(Str(longest=500), 0, 10 ** 6, nullable=True),
    "weights_entry?": Str(nullable=True, longest=200), "architecture?": Str(nullable=True, longest=300),
    "timm_version?": Str(nullable=True, longest=100),
    # code: where it is and the hash it had (registry.rebuild runs it only with consent, and only unchanged)
    "path?": Str(nullable=True), "module?": Str(nullable=True, longest=300),
    "factory?": Str(re.compile(r"[A-Za-z_][A-Za-z0-9_]*"), what="a Python name", nullable=True, longest=200),
    "sha256?": Str(HEX64, what="a sha256 digest", nullable=True), "class?": Str(nullable=True, longest=300),
})
DATASET = Obj({"kind": Str(choices=("imagefolder", "flat", "cifar10")), "root": Str(what="a folder path"),
               "count": Int(0, 10 ** 10), "spec?": Str(nullable=True),
               "classes?": List(Str(longest=500), 0, 10 ** 6, nullable=True),
               "ok?": Int(0, 10 ** 10, nullable=True), "errors?": Int(0, 10 ** 10, nullable=True)})
INDEX_FILE = Str(re.compile(r"index/[A-Za-z0-9_.\-]+\.faiss"), what="a file under index/ ending in .faiss")
SPEC = Obj({"factory": Str(longest=200)})
INDEX_ENTRY = Obj({"file": INDEX_FILE, "sha256": HEX, "layer?": LAYER_NAME, "dim": Int(0, BIG),
                   "count": Int(0, 10 ** 10), "spec": SPEC, "source?": Str(longest=40)})
INDEX = Obj({"images?": Obj({}, values=INDEX_ENTRY), "channels?": Obj({"file": INDEX_FILE, "sha256": HEX, "spec": SPEC,
                                                                       "count": Int(0, 10 ** 10), "dim": Int(0, BIG),
                                                                       "layers": Obj({}, values=Int(0, BIG))},
                                                                      nullable=True),
             "layers?": List(LAYER_NAME, 0, 10_000)}, nullable=True)
OPTIONS = Obj({"batch_size?": Int(1, 1 << 16, nullable=True), "chunk_size?": Int(1, 1 << 24, nullable=True),
               "k?": Int(1, 1 << 16, nullable=True), "seed?": Int(0, SEED_MAX, nullable=True),
               "decode?": Str(choices=DECODERS, nullable=True),
               "precision?": Str(choices=("fp32", "bf16", "fp16"), nullable=True),
               "device?": Str(nullable=True, longest=40), "workers?": Int(0, 4096, nullable=True),
               "image_size?": Int(1, SIDE_MAX, nullable=True), "ranks?": Int(1, 1 << 16, nullable=True)})
COLOUR = Obj({"matrix": List(THREE, 3, 3), "mean?": THREE}, nullable=True)

SCHEMA = Obj({
    "format_version": Int(0, 1000),
    "model": MODEL,
    "dataset": DATASET,
    "preprocessing": PREPROCESSING,
    "k": Int(1, 1 << 16),
    "layers": List(LAYER, 0, 100_000),
    "geometry": Obj({"image_size?": Int(1, SIDE_MAX), "graph?": Bool(), "layers": List(LAYER, 0, 100_000),
                     "pools": List(POOL, 0, 100_000)}),
    "switches?": Obj({"stored?": Bool()}, nullable=True),
    "activations?": Bool(nullable=True),
    "options?": OPTIONS,
    "index?": INDEX,
    "colour?": COLOUR,
    "created?": Str(nullable=True, longest=100),
    "timings?": Obj({}, nullable=True),  # shown, never computed with: any JSON (a rate may be Infinity)
    "tool?": Obj({}, nullable=True),
})


def validate(manifest: Any, where: str) -> dict[str, Any]:
    """The manifest, checked against SCHEMA and for its names' agreement; AtlasError naming `where` and
    the first field that is wrong."""
    try:
        SCHEMA.check(manifest, "")
        _agree(manifest)
    except Invalid as e:
        raise AtlasError(f"{where}: manifest.json {e}") from None
    return manifest


def _agree(m: dict[str, Any]) -> None:
    """What no one field shows: layer and pool names that are unique, and pools_below naming pools."""
    if not os.path.isabs(m["dataset"]["root"]):  # the build records it resolved; anything else is a spec
        raise bad("dataset.root", f"must be an absolute folder path, not {show(m['dataset']['root'])}")
    names = [la["layer"] for la in m["layers"]]
    if len(set(names)) != len(names):
        raise bad("layers", "names a layer twice")
    pools = {p["name"] for p in m["geometry"]["pools"]}
    model_layers = {g["layer"] for g in m["geometry"]["layers"]}
    for i, la in enumerate(m["layers"]):
        if la["layer"] not in model_layers:
            raise bad(f"layers[{i}].layer", f"names a layer '{la['layer']}' that geometry.layers does not hold")
        for name in la.get("pools_below") or []:
            if name not in pools:
                raise bad(f"layers[{i}].pools_below", f"names a pool '{name}' that geometry.pools does not hold")
    index = m.get("index") or {}
    for kind, names in (("images", (index.get("images") or {}).keys()),
                        ("channels.layers", ((index.get("channels") or {}).get("layers") or {}).keys())):
        for name in names:
            if name not in model_layers:
                raise bad(f"index.{kind}", f"names a layer '{name}' that geometry.layers does not hold")


def random_weights(model: dict[str, Any]) -> str | None:
    """The loud line for an atlas of a randomly initialised model (None for trained weights): its pictures
    and numbers look plausible and mean nothing about a trained network, so every view says so on top."""
    if not model.get("random_init"):
        return None
    return (f"RANDOM WEIGHTS (seed {model.get('seed', 0)}, no --weights at build): an untrained "
            f"{model.get('name', 'model')}")
