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

import math
import os
import re
from typing import Any

from .errors import AtlasError

# A module path (resnet's `layer4.1.conv2`, ours `conv5`, timm's `stages.3`): no empty part, so never `..`
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*(?:\.[A-Za-z0-9_\-]+)*")
HEX64 = re.compile(r"[0-9a-f]{64}")
SAFE_TEXT = 4096        # the longest string a field may hold (a note, a path)
BIG = 10 ** 9           # sizes, counts, offsets: anything larger is no atlas this tool wrote
SEED_MAX = 2 ** 32 - 1  # numpy's and the samplers' seeds
SIDE_MAX = 8192         # an image side the tool draws, crops or resizes to
CHANNELS_MAX = 1 << 20


class Field:
    """One value's rule. `check(value, where)` returns the value or raises with `where` named."""

    nullable = False

    def __init__(self, nullable: bool = False):
        self.nullable = nullable

    def check(self, value: Any, where: str) -> Any:
        if value is None:
            if self.nullable:
                return None
            raise _bad(where, f"must be {self.describe()}, not null")
        return self._check(value, where)

    def _check(self, value, where):  # pragma: no cover - every rule overrides it
        raise NotImplementedError

    def describe(self) -> str:
        return "a value"


class Int(Field):
    def __init__(self, lo: int = -BIG, hi: int = BIG, nullable: bool = False):
        super().__init__(nullable)
        self.lo, self.hi = lo, hi

    def _check(self, value, where):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(where, f"must be {self.describe()}, not {_show(value)}")
        if not self.lo <= value <= self.hi:
            raise _bad(where, f"must be {self.describe()}, not {value}")
        return value

    def describe(self):
        return f"a whole number from {self.lo} to {self.hi}"


class Float(Field):
    def __init__(self, lo: float = -1e9, hi: float = 1e9, positive: bool = False, nullable: bool = False):
        super().__init__(nullable)
        self.lo, self.hi, self.positive = lo, hi, positive

    def _check(self, value, where):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _bad(where, f"must be {self.describe()}, not {_show(value)}")
        if not self.lo <= value <= self.hi or (self.positive and value <= 0):
            raise _bad(where, f"must be {self.describe()}, not {value}")
        return value

    def describe(self):
        return f"a {'positive ' if self.positive else ''}finite number from {self.lo:g} to {self.hi:g}"


class Bool(Field):
    def _check(self, value, where):
        if not isinstance(value, bool):
            raise _bad(where, f"must be true or false, not {_show(value)}")
        return value

    def describe(self):
        return "true or false"


class Str(Field):
    def __init__(self, pattern: re.Pattern | None = None, choices: tuple[str, ...] | None = None,
                 what: str = "text", nullable: bool = False, longest: int = SAFE_TEXT):
        super().__init__(nullable)
        self.pattern, self.choices, self.what, self.longest = pattern, choices, what, longest

    def _check(self, value, where):
        if not isinstance(value, str) or len(value) > self.longest or "\x00" in value:
            raise _bad(where, f"must be {self.describe()}, not {_show(value)}")
        if self.choices is not None and value not in self.choices:
            raise _bad(where, f"must be one of {', '.join(self.choices)}, not {_show(value)}")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise _bad(where, f"must be {self.describe()}, not {_show(value)}")
        return value

    def describe(self):
        return f"one of {', '.join(self.choices)}" if self.choices else self.what


class List(Field):
    def __init__(self, item: Field, least: int = 0, most: int = 100_000, nullable: bool = False):
        super().__init__(nullable)
        self.item, self.least, self.most = item, least, most

    def _check(self, value, where):
        if not isinstance(value, list) or not self.least <= len(value) <= self.most:
            raise _bad(where, f"must be {self.describe()}, not {_show(value)}")
        return [self.item.check(v, f"{where}[{i}]") for i, v in enumerate(value)]

    def describe(self):
        size = f"exactly {self.least}" if self.least == self.most else f"{self.least} to {self.most}"
        return f"a list of {size} items, each {self.item.describe()}"


class Obj(Field):
    """An object with known fields: name -> rule (a name ending in '?' is optional). Other keys pass."""

    def __init__(self, fields: dict[str, Field], nullable: bool = False, values: Field | None = None):
        super().__init__(nullable)
        self.fields = {k.rstrip("?"): (rule, k.endswith("?")) for k, rule in fields.items()}
        self.values = values  # a rule for every value of a free-form object (kwargs)

    def _check(self, value, where):
        if not isinstance(value, dict):
            raise _bad(where, f"must be {self.describe()}, not {_show(value)}")
        for key, (rule, optional) in self.fields.items():
            if key in value:
                rule.check(value[key], _join(where, key))
            elif not optional:
                raise _bad(_join(where, key), "is missing")
        if self.values is not None:
            for key, v in value.items():
                if key not in self.fields:
                    if not isinstance(key, str) or not NAME.fullmatch(key):
                        raise _bad(where, f"has a key {_show(key)} that is not a name")
                    self.values.check(v, _join(where, key))
        return value

    def describe(self):
        return "an object"


class OneOf(Field):
    """The first of several rules that accepts the value (JSON scalars of a builder's options)."""

    def __init__(self, *rules: Field, nullable: bool = False):
        super().__init__(nullable)
        self.rules = rules

    def _check(self, value, where):
        for rule in self.rules:
            try:
                return rule.check(value, where)
            except AtlasError:
                continue
        raise _bad(where, f"must be {self.describe()}, not {_show(value)}")

    def describe(self):
        return " or ".join(r.describe() for r in self.rules)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__.replace("dict", "an object") \
        .replace("list", "a list")
    return text if len(text) <= 60 else text[:57] + "..."


class _Invalid(AtlasError):
    def __init__(self, where: str, what: str):
        super().__init__(f"field {where} {what}")
        self.where, self.what = where, what


def _bad(where: str, what: str) -> _Invalid:
    return _Invalid(where or "(the whole manifest)", what)


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
    "num_classes?": Int(1, 10 ** 7, nullable=True), "classes?": List(Str(longest=500), 0, 10 ** 6, nullable=True),
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
               "decode?": Str(choices=("auto", "cpu", "device"), nullable=True),
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
    except _Invalid as e:
        raise AtlasError(f"{where}: manifest.json {e}") from None
    return manifest


def _agree(m: dict[str, Any]) -> None:
    """What no one field shows: layer and pool names that are unique, and pools_below naming pools."""
    if not os.path.isabs(m["dataset"]["root"]):  # the build records it resolved; anything else is a spec
        raise _bad("dataset.root", f"must be an absolute folder path, not {_show(m['dataset']['root'])}")
    names = [la["layer"] for la in m["layers"]]
    if len(set(names)) != len(names):
        raise _bad("layers", "names a layer twice")
    pools = {p["name"] for p in m["geometry"]["pools"]}
    model_layers = {g["layer"] for g in m["geometry"]["layers"]}
    for i, la in enumerate(m["layers"]):
        if la["layer"] not in model_layers:
            raise _bad(f"layers[{i}].layer", f"names a layer '{la['layer']}' that geometry.layers does not hold")
        for name in la.get("pools_below") or []:
            if name not in pools:
                raise _bad(f"layers[{i}].pools_below", f"names a pool '{name}' that geometry.pools does not hold")
    index = m.get("index") or {}
    for kind, names in (("images", (index.get("images") or {}).keys()),
                        ("channels.layers", ((index.get("channels") or {}).get("layers") or {}).keys())):
        for name in names:
            if name not in model_layers:
                raise _bad(f"index.{kind}", f"names a layer '{name}' that geometry.layers does not hold")


def random_weights(model: dict[str, Any]) -> str | None:
    """The loud line for an atlas of a randomly initialised model (None for trained weights): its pictures
    and numbers look plausible and mean nothing about a trained network, so every view says so on top."""
    if not model.get("random_init"):
        return None
    return (f"RANDOM WEIGHTS (seed {model.get('seed', 0)}, no --weights at build): an untrained "
            f"{model.get('name', 'model')}")
