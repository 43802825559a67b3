"""On-disk layouts: sharded safetensors, AscendV1, compressed-tensors with the clip flag.

Each format is one object (:class:`CheckpointFormat`: :data:`ASCENDV1`,
:data:`COMPRESSED_TENSORS`; :data:`FORMATS` maps names to them) that owns all per-format
knowledge; the reader, the writer, the model loader and the converter ask it.
"""

from w4a8moe.formats.ascendv1 import ASCENDV1, AscendV1Format
from w4a8moe.formats.base import CheckpointFormat, ExpertProjection, FormatMetadata, WriteOptions
from w4a8moe.formats.checkpoint import Checkpoint, open_checkpoint
from w4a8moe.formats.compressed_tensors import COMPRESSED_TENSORS, CompressedTensorsFormat
from w4a8moe.formats.layer_tensors import FloatMoELayer, QuantizedMoELayer, quantize_moe_layer
from w4a8moe.formats.model_config import MoEModelConfig, RoutingConfig
from w4a8moe.formats.registry import FORMATS, detect_format, get_format
from w4a8moe.formats.schema import TensorSpec
from w4a8moe.formats.writer import write_checkpoint

__all__ = [
    "ASCENDV1",
    "COMPRESSED_TENSORS",
    "FORMATS",
    "AscendV1Format",
    "Checkpoint",
    "CheckpointFormat",
    "CompressedTensorsFormat",
    "ExpertProjection",
    "FloatMoELayer",
    "FormatMetadata",
    "MoEModelConfig",
    "QuantizedMoELayer",
    "RoutingConfig",
    "TensorSpec",
    "WriteOptions",
    "detect_format",
    "get_format",
    "open_checkpoint",
    "quantize_moe_layer",
    "write_checkpoint",
]
