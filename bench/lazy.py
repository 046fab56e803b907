"""Modules imported on first use, so that `bench --help`, `bench list` and `bench validate` start in a second: the
plug-in modules bind ``torch = lazy_import("torch")`` and torch (2-3 s to import) loads only when a stage computes."""
from __future__ import annotations

import importlib
import types
from typing import Any


class LazyModule(types.ModuleType):
    """Stands for module ``name``; the first attribute access imports it and copies its namespace in, so later
    accesses are plain attribute look-ups."""

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self.__name__)
        if self.__dict__.get("_loaded") is not module:
            self.__dict__.update({k: v for k, v in vars(module).items() if k != "__getattr__"})
            self.__dict__["_loaded"] = module
        return getattr(module, attr)


def lazy_import(name: str) -> Any:
    """A stand-in for ``import name`` that imports ``name`` when an attribute of it is first read."""
    return LazyModule(name)
