"""msModelSlim "AscendV1" layout (SPEC section 5): a flat JSON description of every tensor."""

from __future__ import annotations

import json
from pathlib import Path

from w4a8moe.errors import CheckpointError

DESCRIPTION_FILE = "quant_model_description.json"
WEIGHTS_PREFIX = "quant_model_weights"
INDEX_FILE = f"{WEIGHTS_PREFIX}.safetensors.index.json"
SINGLE_FILE = f"{WEIGHTS_PREFIX}.safetensors"
GLOBAL_KEYS = frozenset(
    {"model_quant_type", "version", "group_size", "metadata", "kv_quant_type", "fa_quant_type",
     "reduce_quant_type", "kv_cache_type"}
)
TENSOR_TYPES = frozenset({"FLOAT", "W8A8", "W8A8_DYNAMIC", "W4A8_DYNAMIC", "W8A16", "W4A16", "C8"})
W4A8 = "W4A8_DYNAMIC"
W8A8_DYNAMIC = "W8A8_DYNAMIC"
FLOAT = "FLOAT"


def read_description(directory: Path) -> tuple[dict[str, str], dict[str, object]]:
    """Read the description; return ``(tensor name -> type, global keys)``.

    Raises :class:`CheckpointError` when the file is unreadable, not a flat object, or holds
    a per-group quantization the runtime does not support.
    """
    path = Path(directory) / DESCRIPTION_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{DESCRIPTION_FILE}: unreadable ({exc})") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{DESCRIPTION_FILE}: expected a JSON object, found {type(raw).__name__}")
    types: dict[str, str] = {}
    globals_: dict[str, object] = {}
    for key, value in raw.items():
        if key in GLOBAL_KEYS or "." not in key:
            globals_[key] = value
            continue
        if not isinstance(value, str) or value not in TENSOR_TYPES:
            raise CheckpointError(
                f"{DESCRIPTION_FILE}: tensor {key!r} has type {value!r}; expected one of {sorted(TENSOR_TYPES)}"
            )
        types[key] = value
    group_size = globals_.get("group_size", 0) or 0
    if group_size != 0:
        raise CheckpointError(
            f"{DESCRIPTION_FILE}: group_size={group_size}: the legacy per-group W4A8 variant "
            "(weight_scale_second) is not supported; expected 0 or absent (per channel)"
        )
    return types, globals_


def build_description(types: dict[str, str], metadata: dict[str, object] | None = None) -> dict[str, object]:
    """The description for ``types`` (tensor name -> type), with the global keys."""
    out: dict[str, object] = {"model_quant_type": W4A8, "version": "1.0.0", "group_size": 0}
    if metadata:
        out["metadata"] = metadata
    out.update(types)
    return out
