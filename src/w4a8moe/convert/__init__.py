"""Converting Hugging Face MoE checkpoints (bf16/fp16/fp32 or DeepSeek block FP8) to W4A8."""

from w4a8moe.convert.pipeline import REPORT_FILE, convert
from w4a8moe.convert.policy import DEFAULT_KEEP_BF16, LayerPolicy
from w4a8moe.convert.source import SourceCheckpoint, dequantize_fp8_blockwise

__all__ = ["DEFAULT_KEEP_BF16", "REPORT_FILE", "LayerPolicy", "SourceCheckpoint", "convert", "dequantize_fp8_blockwise"]
