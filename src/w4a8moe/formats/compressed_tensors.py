"""compressed-tensors style config with ``activation_use_clip`` (SPEC section 6).

The ``compressed-tensors`` package validates the scheme, but its config groups forbid
unknown keys, so the clip flag is taken out before validation and put back on writing.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from w4a8moe.errors import CheckpointError

if TYPE_CHECKING:  # imported where used: compressed-tensors imports transformers (seconds)
    from compressed_tensors.quantization import QuantizationConfig

CLIP_KEY = "activation_use_clip"
MOE_TARGET = "MoEGMM"
FALLBACK_GROUP = "group_1"
ACCEPTED_METHODS = ("compressed-tensors", "modelslim")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
WEIGHTS_PREFIX = "model"

_INT_TOKEN_DYNAMIC = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


def _weights(bits: int) -> dict[str, object]:
    return {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}


def find_moe_group(config_groups: dict) -> str | None:
    """Name of the group targeting ``MoEGMM``; ``group_1`` as a fallback; ``None`` if neither."""
    for name, group in config_groups.items():
        if isinstance(group, dict) and MOE_TARGET in (group.get("targets") or []):
            return name
    return FALLBACK_GROUP if FALLBACK_GROUP in config_groups else None


def parse_quantization_config(qc: dict) -> tuple[QuantizationConfig, bool, str]:
    """Validate ``quantization_config``; return ``(scheme, activation_use_clip, moe group name)``."""
    if not isinstance(qc, dict):
        raise CheckpointError("config.json: quantization_config must be an object")
    method = qc.get("quant_method")
    if method not in ACCEPTED_METHODS:
        raise CheckpointError(f"config.json: quantization_config.quant_method is {method!r}; expected one of {ACCEPTED_METHODS}")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError("config.json: quantization_config.config_groups missing or empty")
    moe_group = find_moe_group(groups)
    if moe_group is None:
        raise CheckpointError(
            f"config.json: no config group targets {MOE_TARGET!r} (and no {FALLBACK_GROUP!r}); "
            f"groups are {sorted(groups)}"
        )
    stripped = copy.deepcopy(qc)
    clip = False
    for name, group in stripped["config_groups"].items():
        if isinstance(group, dict) and CLIP_KEY in group:
            value = group.pop(CLIP_KEY)
            if not isinstance(value, bool):
                raise CheckpointError(f"config.json: {name}.{CLIP_KEY} must be true or false, found {value!r}")
            if name == moe_group:
                clip = value
    stripped["quant_method"] = "compressed-tensors"
    from compressed_tensors.quantization import QuantizationConfig
    from pydantic import ValidationError

    try:
        scheme = QuantizationConfig.model_validate(stripped)
    except ValidationError as exc:
        raise CheckpointError(f"config.json: invalid quantization_config: {exc}") from exc
    weights = scheme.config_groups[moe_group].weights
    if weights is None or weights.num_bits != 4:
        found = None if weights is None else weights.num_bits
        raise CheckpointError(f"config.json: MoE group {moe_group!r} weights.num_bits is {found}; expected 4")
    return scheme, clip, moe_group


def build_quantization_config(activation_use_clip: bool, ignore: list[str]) -> dict:
    """A W8A8 ``Linear`` group and a W4A8 ``MoEGMM`` group carrying the clip flag."""
    qc = {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": _weights(8), "input_activations": dict(_INT_TOKEN_DYNAMIC)},
            FALLBACK_GROUP: {"targets": [MOE_TARGET], "weights": _weights(4), "input_activations": dict(_INT_TOKEN_DYNAMIC)},
        },
        "ignore": sorted(ignore),
    }
    # Validate what we write with the same package that will read it.
    from compressed_tensors.quantization import QuantizationConfig

    QuantizationConfig.model_validate(qc)
    qc["config_groups"][FALLBACK_GROUP][CLIP_KEY] = bool(activation_use_clip)
    return qc
