"""Lazy package exports: a package's public names imported on first use (module ``__getattr__``).

``import w4a8moe`` and the ``inspect``/``verify`` commands then load neither the converter,
the model code, transformers nor compressed-tensors (seconds of import time) until a name
that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(namespace: dict, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for a package whose ``exports`` map public name -> defining module.

    A name is imported from its module on first access and stored in ``namespace`` (the
    package's ``globals()``), so later look-ups are ordinary attribute reads.
    """

    def __getattr__(name: str) -> object:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
