"""Consent to run a model's own code when an atlas reopens it.

An atlas built from `--model net.py:make_model` (or `pkg.module:make_model`) records where that code is,
so that it can be rebuilt later. Running code from a path someone else wrote into a manifest would let
any shared atlas run anything, so reopening such a model needs the user's word: `--trust-code` on the
command line, `atlas.open(path, trust_code=True)` in Python, or the module itself
(`atlas.open(path, model=net)`), which runs nothing.

The consent is kept per atlas folder for the whole process, not per handle: the picture renderer and
the similarity functions reopen the same folder by path (a second handle), and they must see what the
user agreed to. Torch-free: `atlas --help` and `atlas sql` import this.
"""
from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

from ..errors import AtlasError

CODE_SOURCES = ("file", "module")  # sources whose rebuild runs the user's code
FLAG = "--trust-code"

_trusted: set[str] = set()                         # atlas folders (resolved) whose model code may run
_given: dict[str, "weakref.ReferenceType"] = {}    # atlas folder -> the nn.Module the user passed
_command_trusts = False                            # --trust-code on this command line


def _key(path: str | Path) -> str:
    return str(Path(path).resolve())


def grant(path: str | Path) -> None:
    """The user agrees to run the model code of the atlas at `path` (atlas.open(..., trust_code=True))."""
    _trusted.add(_key(path))


def give(path: str | Path, model: Any) -> None:
    """The user passes the atlas's model as an object: nothing of the manifest's runs."""
    _given[_key(path)] = weakref.ref(model)


def given(path: str | Path):
    """The module passed for the atlas at `path`, while the caller still holds it; else None."""
    ref = _given.get(_key(path))
    return ref() if ref is not None else None


def trust_command(on: bool) -> None:
    """--trust-code: every atlas this command opens may run its model's code (reset when it ends)."""
    global _command_trusts
    _command_trusts = bool(on)


def trusted(path: str | Path) -> bool:
    return _command_trusts or _key(path) in _trusted


def refusal(atlas_path: str | Path, record: dict[str, Any], code: str | None = None) -> AtlasError:
    """The one line that says what opening the model would run and how to agree to it. `code`: what
    would run (registry.unvetted); by default the record's file or module."""
    if record.get("source") == "object":
        return AtlasError(f"atlas '{atlas_path}' was built from a model passed from Python "
                          f"({record.get('class') or record.get('name')}): pass it again, "
                          "atlas.open(path, model=<the nn.Module>)")
    what = code or (f"the file '{record.get('path')}' ({record.get('factory')}())" if record.get("source") == "file"
                    else f"the Python module '{record.get('module')}' ({record.get('factory')}())")
    return AtlasError(f"atlas '{atlas_path}' rebuilds its model by running {what}; "
                      f"if you trust that code pass {FLAG} (Python: atlas.open(path, trust_code=True), or "
                      "atlas.open(path, model=<the nn.Module>) to run nothing)")
