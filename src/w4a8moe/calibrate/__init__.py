"""Learning the W4A8 clips from calibration data: per-channel weight clips and the
per-expert activation clip, each chosen on the expert's output error."""

from w4a8moe.calibrate.clips import (
    DEFAULT_ALPHA_GRID,
    DEFAULT_MIN_EXPERT_TOKENS,
    DEFAULT_WEIGHT_CLIP_GRID,
    ClipSearchSettings,
    ExpertClips,
    ExpertWeights,
    expert_reference_output,
    learn_expert_clips,
    quantized_expert_output,
    search_alpha,
    search_weight_clip,
)
from w4a8moe.calibrate.gptq import gptq_int4

__all__ = [
    "DEFAULT_ALPHA_GRID",
    "DEFAULT_MIN_EXPERT_TOKENS",
    "DEFAULT_WEIGHT_CLIP_GRID",
    "ClipSearchSettings",
    "ExpertClips",
    "ExpertWeights",
    "expert_reference_output",
    "gptq_int4",
    "learn_expert_clips",
    "quantized_expert_output",
    "search_alpha",
    "search_weight_clip",
]
