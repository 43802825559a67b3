"""w4a8moe: W4A8 quantization of MoE language models with a learned activation clip.

Public API: :func:`open_checkpoint`, :class:`Checkpoint`, :func:`write_checkpoint`,
:class:`CheckpointError`, the MoE layer :class:`W4A8MoE`.
"""

from w4a8moe.errors import CheckpointError, ConfigError, ConversionError, W4A8MoEError
from w4a8moe.formats import (
    Checkpoint,
    FloatMoELayer,
    QuantizedMoELayer,
    open_checkpoint,
    write_checkpoint,
)
from w4a8moe.moe import W4A8MoE
from w4a8moe.convert import convert
from w4a8moe.models import load_model

__version__ = "0.1.0"

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
