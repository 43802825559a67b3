"""What marks each W4A8 format in what vLLM hands a quantization config.

vLLM gives ``override_quantization_method`` / ``from_config`` the checkpoint's
``config.json:quantization_config`` (compressed-tensors) or the content of
``quant_model_description.json`` (AscendV1, with ``--quantization w4a8moe``). Everything else
the plugin needs per format (which tensors an expert projection and a W8A8 Linear hold, how
scales are decoded) it asks the format objects of :mod:`w4a8moe.formats`.
"""

from __future__ import annotations

from w4a8moe.errors import CheckpointError
from w4a8moe.formats import ASCENDV1, COMPRESSED_TENSORS, CheckpointFormat
from w4a8moe.formats.ascendv1 import DESCRIPTION_FILE
from w4a8moe.formats.base import W4A8_DYNAMIC
from w4a8moe.formats.compressed_tensors import MOE_TARGET

__all__ = ["DESCRIPTION_FILE", "claims_quant_config", "format_of_quant_config", "expert_suffixes"]


def claims_quant_config(quant_config: dict) -> bool:
    """Whether ``config.json:quantization_config`` is a W4A8 compressed-tensors config: a config
    group targets ``MoEGMM`` (any ``quant_method`` spelling the format accepts). Only the
    marker is checked here; the checkpoint is validated in full when the engine opens it."""
    if not isinstance(quant_config, dict) or quant_config.get("quant_method") not in COMPRESSED_TENSORS.quant_methods:
        return False
    groups = quant_config.get("config_groups")
    return isinstance(groups, dict) and any(
        isinstance(g, dict) and MOE_TARGET in (g.get("targets") or []) for g in groups.values())


def format_of_quant_config(config: dict) -> CheckpointFormat:
    """The format of what vLLM passes to ``from_config``."""
    if claims_quant_config(config):
        return COMPRESSED_TENSORS
    if isinstance(config, dict) and W4A8_DYNAMIC in config.values():
        return ASCENDV1
    raise CheckpointError(
        f"w4a8moe: the quantization config is neither a compressed-tensors config with a {MOE_TARGET!r} group "
        f"nor an AscendV1 {DESCRIPTION_FILE} with {W4A8_DYNAMIC} tensors")


def expert_suffixes(fmt: CheckpointFormat, proj: str, with_alpha: bool) -> tuple[str, ...]:
    """The tensor suffixes one routed expert projection holds in ``fmt`` (shapes do not matter)."""
    return tuple(fmt.expert_specs(proj, 2, 16, 2, with_alpha))
