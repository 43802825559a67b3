"""msModelSlim "AscendV1" layout (SPEC section 5): a flat JSON description of every tensor.

The format object :data:`ASCENDV1`: weights in ``quant_model_weights*.safetensors``, every
tensor typed in ``quant_model_description.json``, fp32 scales with zero offsets, the kernel
bias as ``scale_bias`` (``[N, 1]``; the down projection's as 16 K-chunk partial sums
``[H, 16]`` so tensor-parallel ranks can take their slice), no activation clip.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from w4a8moe.errors import CheckpointError
from w4a8moe.formats.base import (
    FLOAT,
    W4A8_DYNAMIC,
    W8A8_DYNAMIC,
    CheckpointFormat,
    FormatMetadata,
    TensorGetter,
    WriteOptions,
)
from w4a8moe.formats.safetensors_io import atomic_write_json
from w4a8moe.formats.schema import SCALE_DTYPES, TensorSpec
from w4a8moe.quant import KERNEL_BIAS_CHUNKS, kernel_bias_packed

DESCRIPTION_FILE = "quant_model_description.json"
WEIGHTS_PREFIX = "quant_model_weights"
INDEX_FILE = f"{WEIGHTS_PREFIX}.safetensors.index.json"
SINGLE_FILE = f"{WEIGHTS_PREFIX}.safetensors"
GLOBAL_KEYS = frozenset(
    {"model_quant_type", "version", "group_size", "metadata", "kv_quant_type", "fa_quant_type",
     "reduce_quant_type", "kv_cache_type"}
)
TENSOR_TYPES = frozenset({"FLOAT", "W8A8", "W8A8_DYNAMIC", "W4A8_DYNAMIC", "W8A16", "W4A16", "C8"})
W4A8 = W4A8_DYNAMIC


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


def _zero_offset_problem(name: str, get: TensorGetter, what: str) -> list[str]:
    if bool((get(name) != 0).any()):
        return [f"tensor {name!r}: expected all zeros ({what}), found non-zero values"]
    return []


class AscendV1Format(CheckpointFormat):
    """The AscendV1 layout (msModelSlim, Ascend NPU engines); no activation clip."""

    name = "ascendv1"
    weights_prefix = WEIGHTS_PREFIX
    index_file = INDEX_FILE
    single_file = SINGLE_FILE
    shard_glob = f"{WEIGHTS_PREFIX}*.safetensors"
    marker = DESCRIPTION_FILE
    carries_activation_clip = False
    quant_methods = ()

    def detect(self, directory: str | Path, config: dict | None = None) -> bool:
        """A ``quant_model_description.json`` beside the weights marks AscendV1."""
        return (Path(directory) / DESCRIPTION_FILE).exists()

    # ------------------------------------------------------------ metadata
    def read_metadata(self, directory: Path, config: dict) -> FormatMetadata:
        """The description (tensor types and global keys); no clip."""
        description, globals_ = read_description(directory)
        return FormatMetadata(activation_use_clip=False, description=description, description_globals=globals_)

    def write_metadata(self, directory: Path, config: dict, types: dict[str, str], ignore: list[str],
                       options: WriteOptions, description_metadata: dict | None = None) -> dict:
        """Write the description of every tensor; ``config.json`` carries no ``quantization_config``."""
        metadata = {"producer": "w4a8moe", **(description_metadata or {})}
        atomic_write_json(Path(directory) / DESCRIPTION_FILE, build_description(types, metadata))
        out = dict(config)
        out.pop("quantization_config", None)
        return out

    def record_tensor(self, name: str, tensor: torch.Tensor, role: str, types: dict[str, str],
                      ignore: list[str]) -> None:
        """Every tensor is typed in the description by its role."""
        types[name] = role

    def metadata_problems(self, model_config, infos: dict, metadata: FormatMetadata,
                          expert_tensors: set[str]) -> list[str]:
        """The 16-chunk down bias needs I divisible by 16; the description lists exactly the
        weights; expert tensors are typed W4A8_DYNAMIC."""
        problems = []
        inter = model_config.moe_intermediate_size
        if inter % KERNEL_BIAS_CHUNKS:
            problems.append(
                f"config.json: moe_intermediate_size={inter} is not divisible by "
                f"{KERNEL_BIAS_CHUNKS}, as the AscendV1 down-projection scale_bias needs"
            )
        description = metadata.description
        for name in infos:
            if name not in description:
                problems.append(f"tensor {name!r} is in the weights but not in {DESCRIPTION_FILE}")
        for name in description:
            if name not in infos:
                problems.append(f"{DESCRIPTION_FILE} lists tensor {name!r}, which is not in the weights")
        for name in sorted(expert_tensors):
            kind = description.get(name)
            if kind is not None and kind != W4A8:
                problems.append(f"{DESCRIPTION_FILE}: {name!r} is {kind}, expected {W4A8}")
        return problems

    # ------------------------------------------------------------ tensors
    def expert_specs(self, proj: str, n: int, k: int, hidden: int, with_alpha: bool) -> dict[str, TensorSpec]:
        """weight int8 ``[N/2, K]``, weight_scale fp32/uint64 ``[N, 1]``, weight_offset fp32
        ``[N, 1]``, scale_bias fp32 ``[N, 1]`` (down: ``[H, 16]``)."""
        bias_shape = (hidden, KERNEL_BIAS_CHUNKS) if proj == "down" else (n, 1)
        return {
            "weight": TensorSpec((torch.int8,), ((n // 2, k),)),
            "weight_scale": TensorSpec(SCALE_DTYPES, ((n, 1),)),
            "weight_offset": TensorSpec((torch.float32,), ((n, 1),)),
            "scale_bias": TensorSpec((torch.float32,), (bias_shape,)),
        }

    def expert_tensors(self, proj: str, packed: torch.Tensor, scale: torch.Tensor,
                       alpha: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """fp32 scales, zero offsets, the kernel bias (down: per K-chunk); ``alpha`` is not stored."""
        n = 2 * packed.shape[0]
        scale = scale.to(torch.float32).reshape(n)
        return {
            "weight": packed.contiguous(),
            "weight_scale": scale.reshape(n, 1).clone(),
            "weight_offset": torch.zeros(n, 1, dtype=torch.float32),
            "scale_bias": (kernel_bias_packed(packed, scale, KERNEL_BIAS_CHUNKS) if proj == "down"
                           else kernel_bias_packed(packed, scale).reshape(n, 1)),
        }

    def kernel_bias_suffix(self, proj: str) -> str:
        return "scale_bias"

    def expert_problems(self, prefix: str, get: TensorGetter) -> list[str]:
        """Offsets must be zero: the int4 quantization is symmetric."""
        return _zero_offset_problem(f"{prefix}.weight_offset", get, "symmetric")

    def linear_specs(self, n: int, k: int) -> dict[str, TensorSpec]:
        return {
            "weight": TensorSpec((torch.int8,), ((n, k),)),
            "weight_scale": TensorSpec((torch.float32, torch.bfloat16), ((n, 1),)),
            "weight_offset": TensorSpec((torch.float32, torch.bfloat16), ((n, 1),)),
        }

    def linear_tensors(self, weight_q: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        n = weight_q.shape[0]
        return {"weight": weight_q.contiguous(), "weight_scale": scale.to(torch.float32).reshape(n, 1).clone(),
                "weight_offset": torch.zeros(n, 1, dtype=torch.float32)}

    def linear_problems(self, base: str, get: TensorGetter) -> list[str]:
        """Offsets must be zero: W8A8 is symmetric."""
        return _zero_offset_problem(f"{base}.weight_offset", get, "symmetric W8A8")


ASCENDV1 = AscendV1Format()
"""The AscendV1 format object."""

__all__ = ["ASCENDV1", "AscendV1Format", "FLOAT", "W4A8", "W8A8_DYNAMIC", "build_description", "read_description"]
