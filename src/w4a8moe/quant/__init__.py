"""The math of SPEC sections 1, 2 and 4 as pure tensor functions.

Nothing here does I/O or knows about models; every other part of the package (formats,
runtime layer, kernels, converter, tests) calls these functions rather than re-deriving
the math.
"""

from w4a8moe.quant.int4 import INT4_MAX, INT4_MIN_KERNEL, pack_int4_pairs, unpack_int4_pairs
from w4a8moe.quant.scales import decode_scale_uint64, encode_scale_uint64
from w4a8moe.quant.weights import (
    KERNEL_BIAS_CHUNKS,
    dequantize_per_channel,
    kernel_bias,
    checked_channel_amax,
    per_channel_scale,
    quantize_with_scale,
    fake_quantize_with_scale,
    kernel_bias_chunks,
    kernel_bias_packed,
    quantize_int4_per_channel,
    quantize_int8_per_channel,
)
from w4a8moe.quant.activations import (
    INT8_MAX,
    clip_quant_rows,
    dynamic_quant_per_token,
    silu_and_mul,
    silu_mul_fp32,
    swiglu_clip_quant,
    swiglu_fp32,
)
from w4a8moe.quant.matmul import int8_matmul_int32, scale_int32, scaled_int_matmul, w8a8_linear

__all__ = [
    "INT4_MAX",
    "INT4_MIN_KERNEL",
    "INT8_MAX",
    "KERNEL_BIAS_CHUNKS",
    "pack_int4_pairs",
    "unpack_int4_pairs",
    "encode_scale_uint64",
    "decode_scale_uint64",
    "quantize_int4_per_channel",
    "quantize_int8_per_channel",
    "dequantize_per_channel",
    "checked_channel_amax",
    "per_channel_scale",
    "quantize_with_scale",
    "fake_quantize_with_scale",
    "kernel_bias",
    "kernel_bias_chunks",
    "kernel_bias_packed",
    "dynamic_quant_per_token",
    "silu_mul_fp32",
    "silu_and_mul",
    "clip_quant_rows",
    "swiglu_fp32",
    "swiglu_clip_quant",
    "int8_matmul_int32",
    "scale_int32",
    "scaled_int_matmul",
    "w8a8_linear",
]
