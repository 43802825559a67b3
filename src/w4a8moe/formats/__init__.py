"""On-disk layouts: sharded safetensors, AscendV1, compressed-tensors with the clip flag."""

from w4a8moe.formats.checkpoint import Checkpoint, detect_format, open_checkpoint
from w4a8moe.formats.layer_tensors import FloatMoELayer, QuantizedMoELayer, quantize_moe_layer
from w4a8moe.formats.model_config import MoEModelConfig, RoutingConfig
from w4a8moe.formats.schema import ASCENDV1, COMPRESSED_TENSORS, FORMATS
from w4a8moe.formats.writer import write_checkpoint

__all__ = [
    "ASCENDV1",
    "COMPRESSED_TENSORS",
    "FORMATS",
    "Checkpoint",
    "FloatMoELayer",
    "MoEModelConfig",
    "QuantizedMoELayer",
    "RoutingConfig",
    "detect_format",
    "open_checkpoint",
    "quantize_moe_layer",
    "write_checkpoint",
]
