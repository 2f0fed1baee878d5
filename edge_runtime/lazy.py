"""Package attributes loaded on first use: a package's ``__init__`` names what it exports, and importing the package
(or one of its leaves) loads none of the modules behind those names until one is asked for."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, modules: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``modules[name]`` (a dotted module path, or a bare module name
    inside the package) is imported when ``name`` is first read; any other name that is a submodule
    (``edge_runtime.errors``) is imported as such."""

    def attribute(name: str) -> Any:
        if name in modules:
            module = modules[name]
            return getattr(importlib.import_module(module if "." in module else f"{package}.{module}"), name)
        if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return attribute
