"""Everything the vLLM plugin knows about the two checkpoint formats, in one place.

What marks each format in what vLLM hands a quantization config, which tensors an expert
projection and a W8A8 Linear hold, and how scales are decoded: all read from
:mod:`w4a8moe.formats` (its schema tables and parsers), so that the plugin holds no format
rule of its own.
"""

from __future__ import annotations

import torch

from w4a8moe.errors import CheckpointError
from w4a8moe.formats import ascendv1, compressed_tensors
from w4a8moe.formats.schema import ASCENDV1, COMPRESSED_TENSORS, expert_projection_specs, w8a8_linear_specs
from w4a8moe.quant import decode_scale_uint64

__all__ = ["ASCENDV1", "COMPRESSED_TENSORS", "claims_quant_config", "format_of_quant_config",
           "expert_suffixes", "linear_suffixes", "decode_scale", "DESCRIPTION_FILE"]

DESCRIPTION_FILE = ascendv1.DESCRIPTION_FILE


def claims_quant_config(quant_config: dict) -> bool:
    """Whether ``config.json:quantization_config`` is a W4A8 compressed-tensors config: a config
    group targets ``MoEGMM`` (``quant_method`` either spelling). Only the marker is checked
    here; the checkpoint is validated in full when the engine opens it."""
    if not isinstance(quant_config, dict):
        return False
    if quant_config.get("quant_method") not in compressed_tensors.ACCEPTED_METHODS:
        return False
    groups = quant_config.get("config_groups")
    if not isinstance(groups, dict):
        return False
    return any(isinstance(g, dict) and compressed_tensors.MOE_TARGET in (g.get("targets") or [])
               for g in groups.values())


def format_of_quant_config(config: dict) -> str:
    """The format of what vLLM passes to ``from_config``: the ``quantization_config`` of a
    compressed-tensors checkpoint, or an AscendV1 ``quant_model_description.json``."""
    if claims_quant_config(config):
        return COMPRESSED_TENSORS
    if isinstance(config, dict) and ascendv1.W4A8 in config.values():
        return ASCENDV1
    raise CheckpointError(
        "w4a8moe: the quantization config is neither a compressed-tensors config with a "
        f"{compressed_tensors.MOE_TARGET!r} group nor an AscendV1 {DESCRIPTION_FILE} with "
        f"{ascendv1.W4A8} tensors"
    )


def expert_suffixes(fmt: str, proj: str, with_alpha: bool) -> tuple[str, ...]:
    """The tensor suffixes one routed expert projection holds in ``fmt``."""
    return tuple(expert_projection_specs(fmt, proj, 2, 16, 2, with_alpha))


def linear_suffixes(fmt: str) -> tuple[str, ...]:
    """The tensor suffixes a W8A8 Linear holds in ``fmt``."""
    return tuple(w8a8_linear_specs(fmt, 2, 2))


def decode_scale(t: torch.Tensor) -> torch.Tensor:
    """A stored per-channel scale as fp32 ``[N]`` (uint64 scales hold fp32 bits)."""
    if t.dtype == torch.uint64:
        t = decode_scale_uint64(t)
    return t.to(torch.float32).reshape(-1)
