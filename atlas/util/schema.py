"""Declarative checks for JSON someone else may have written (an atlas's manifest, a comparison's record,
a model's constructor options): a rule per value, `check(value, where)` returning it or raising one
AtlasError that names the field (`where`) and what is wrong. Unknown keys of an object pass: a newer tool may
write more, and the code reads none of them.

Torch-free: `atlas sql` and `atlas info` check manifests with it.
"""
from __future__ import annotations

import math
import re
from typing import Any

from ..errors import AtlasError

BIG = 10 ** 9  # sizes, counts, offsets: anything larger is no value this tool wrote
SAFE_TEXT = 4096  # the longest string a field may hold (a note, a path)
CLASSES_MAX = 30_000  # ImageNet-21k has 21,843; a classifier far wider is a memory bomb, not a model
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*(?:\.[A-Za-z0-9_\-]+)*")  # a module path; never an empty part


class Field:
    """One value's rule. `check(value, where)` returns the value or raises with `where` named."""

    nullable = False

    def __init__(self, nullable: bool = False):
        self.nullable = nullable

    def check(self, value: Any, where: str) -> Any:
        if value is None:
            if self.nullable:
                return None
            raise bad(where, f"must be {self.describe()}, not null")
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
            raise bad(where, f"must be {self.describe()}, not {show(value)}")
        if not self.lo <= value <= self.hi:
            raise bad(where, f"must be {self.describe()}, not {value}")
        return value

    def describe(self):
        return f"a whole number from {self.lo} to {self.hi}"


class Float(Field):
    def __init__(self, lo: float = -1e9, hi: float = 1e9, positive: bool = False, nullable: bool = False):
        super().__init__(nullable)
        self.lo, self.hi, self.positive = lo, hi, positive

    def _check(self, value, where):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(where, f"must be {self.describe()}, not {show(value)}")
        if not self.lo <= value <= self.hi or (self.positive and value <= 0):
            raise bad(where, f"must be {self.describe()}, not {value}")
        return value

    def describe(self):
        return f"a {'positive ' if self.positive else ''}finite number from {self.lo:g} to {self.hi:g}"


class Bool(Field):
    def _check(self, value, where):
        if not isinstance(value, bool):
            raise bad(where, f"must be true or false, not {show(value)}")
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
            raise bad(where, f"must be {self.describe()}, not {show(value)}")
        if self.choices is not None and value not in self.choices:
            raise bad(where, f"must be one of {', '.join(self.choices)}, not {show(value)}")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise bad(where, f"must be {self.describe()}, not {show(value)}")
        return value

    def describe(self):
        return f"one of {', '.join(self.choices)}" if self.choices else self.what


class List(Field):
    def __init__(self, item: Field, least: int = 0, most: int = 100_000, nullable: bool = False):
        super().__init__(nullable)
        self.item, self.least, self.most = item, least, most

    def _check(self, value, where):
        if not isinstance(value, list) or not self.least <= len(value) <= self.most:
            raise bad(where, f"must be {self.describe()}, not {show(value)}")
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
            raise bad(where, f"must be {self.describe()}, not {show(value)}")
        for key, (rule, optional) in self.fields.items():
            if key in value:
                rule.check(value[key], join(where, key))
            elif not optional:
                raise bad(join(where, key), "is missing")
        if self.values is not None:
            for key, v in value.items():
                if key not in self.fields:
                    if not isinstance(key, str) or not NAME.fullmatch(key):
                        raise bad(where, f"has a key {show(key)} that is not a name")
                    self.values.check(v, join(where, key))
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
        raise bad(where, f"must be {self.describe()}, not {show(value)}")

    def describe(self):
        return " or ".join(r.describe() for r in self.rules)


def join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def show(value: Any) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__.replace("dict", "an object") \
        .replace("list", "a list")
    return text if len(text) <= 60 else text[:57] + "..."


class Invalid(AtlasError):
    def __init__(self, where: str, what: str):
        super().__init__(f"field {where} {what}")
        self.where, self.what = where, what


def bad(where: str, what: str) -> Invalid:
    return Invalid(where or "(the whole manifest)", what)
