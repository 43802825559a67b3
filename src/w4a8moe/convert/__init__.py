"""Converting Hugging Face MoE checkpoints (bf16/fp16/fp32 or DeepSeek block FP8) to W4A8.

Names are imported on first use (:mod:`w4a8moe._lazy`).
"""

from typing import TYPE_CHECKING

from w4a8moe._lazy import lazy_exports

_EXPORTS = {
    "DEFAULT_KEEP_BF16": "w4a8moe.convert.policy",
    "LayerPolicy": "w4a8moe.convert.policy",
    "REPORT_FILE": "w4a8moe.convert.pipeline",
    "convert": "w4a8moe.convert.pipeline",
    "SourceCheckpoint": "w4a8moe.convert.source",
    "dequantize_fp8_blockwise": "w4a8moe.convert.source",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from w4a8moe.convert.pipeline import REPORT_FILE, convert
    from w4a8moe.convert.policy import DEFAULT_KEEP_BF16, LayerPolicy
    from w4a8moe.convert.source import SourceCheckpoint, dequantize_fp8_blockwise

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
