"""w4a8moe: W4A8 quantization of MoE language models with a learned activation clip.

Public API: :func:`open_checkpoint`, :class:`Checkpoint`, :func:`write_checkpoint`,
:class:`CheckpointError`, the MoE layer :class:`W4A8MoE`, :func:`convert`, :func:`load_model`.

The names are loaded on first use (:mod:`w4a8moe._lazy`), so ``import w4a8moe`` does not
pay for the converter, the model code, transformers or compressed-tensors.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING

from w4a8moe._lazy import lazy_exports
from w4a8moe.errors import CheckpointError, ConfigError, ConversionError, W4A8MoEError

__version__ = "0.1.0"

_LAZY = {
    "Checkpoint": "w4a8moe.formats",
    "FloatMoELayer": "w4a8moe.formats",
    "QuantizedMoELayer": "w4a8moe.formats",
    "open_checkpoint": "w4a8moe.formats",
    "write_checkpoint": "w4a8moe.formats",
    "W4A8MoE": "w4a8moe.moe",
    "load_model": "w4a8moe.models",
}

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "ConversionError",
    "FloatMoELayer",
    "QuantizedMoELayer",
    "W4A8MoE",
    "W4A8MoEError",
    "convert",
    "load_model",
    "open_checkpoint",
    "write_checkpoint",
]

if TYPE_CHECKING:
    from w4a8moe.convert import convert
    from w4a8moe.formats import Checkpoint, FloatMoELayer, QuantizedMoELayer, open_checkpoint, write_checkpoint
    from w4a8moe.models import load_model
    from w4a8moe.moe import W4A8MoE


__getattr__, __dir__ = lazy_exports(globals(), _LAZY)


class _Package(types.ModuleType):
    """The package's module type: ``w4a8moe.convert`` is the :func:`convert` function.

    The name is also the subpackage's, which the import system binds onto the package
    whenever ``w4a8moe.convert.*`` is first imported; a property keeps the function
    (imported on first use) in that place, as an eager ``from ... import convert`` did.
    """

    @property
    def convert(self):
        from w4a8moe.convert.pipeline import convert

        return convert

    @convert.setter
    def convert(self, subpackage: types.ModuleType) -> None:
        pass  # the import system binding the subpackage: it stays reachable in sys.modules


sys.modules[__name__].__class__ = _Package
