"""compressed-tensors style config with ``activation_use_clip`` (SPEC section 6).

The format object :data:`COMPRESSED_TENSORS`: weights in ``model*.safetensors``, the scheme
in ``config.json:quantization_config`` (a W8A8 ``Linear`` group and a W4A8 ``MoEGMM`` group,
``group_1``, carrying the clip flag), uint64-encoded scales, the kernel bias as ``bias``
``[N]`` and, with the clip, one fp32 ``alpha`` per expert down projection.

``quant_method`` is written as ``"compressed-tensors"`` (the reference converter's spelling)
or, on request, ``"modelslim"`` (what sglang 0.5.7's NPU path loads; it reads
``group_1.activation_use_clip``, detects W4 by the ``MoEGMM`` target and loads the bias
tensors only under that spelling); both are read.

The ``compressed-tensors`` package (which imports transformers, seconds) validates the
scheme; it is imported only inside the functions that validate. Its config groups forbid
unknown keys, so the clip flag is taken out before validation and put back on writing.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from w4a8moe.errors import CheckpointError
from w4a8moe.formats.base import FLOAT, CheckpointFormat, FormatMetadata, TensorGetter, WriteOptions, read_config
from w4a8moe.formats.schema import SCALE_DTYPES, TensorSpec
from w4a8moe.quant import encode_scale_uint64, kernel_bias_packed

CLIP_KEY = "activation_use_clip"
MOE_TARGET = "MoEGMM"
FALLBACK_GROUP = "group_1"
LINEAR_GROUP = "group_0"
ACCEPTED_METHODS = ("compressed-tensors", "modelslim")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
WEIGHTS_PREFIX = "model"

_INT_TOKEN_DYNAMIC = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


def _weights(bits: int) -> dict[str, object]:
    return {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}


def _validate_scheme(qc: dict):
    """``QuantizationConfig.model_validate(qc)``; the package is imported here, at first use."""
    from compressed_tensors.quantization import QuantizationConfig

    return QuantizationConfig.model_validate(qc)


def find_moe_group(config_groups: dict) -> str | None:
    """Name of the group targeting ``MoEGMM``; ``group_1`` as a fallback; ``None`` if neither."""
    for name, group in config_groups.items():
        if isinstance(group, dict) and MOE_TARGET in (group.get("targets") or []):
            return name
    return FALLBACK_GROUP if FALLBACK_GROUP in config_groups else None


def parse_quantization_config(qc: dict) -> tuple[object, bool, str]:
    """Validate ``quantization_config``; return ``(scheme, activation_use_clip, moe group name)``.

    ``scheme`` is the ``compressed_tensors`` ``QuantizationConfig``.
    """
    from pydantic import ValidationError

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
    try:
        scheme = _validate_scheme(stripped)
    except ValidationError as exc:
        raise CheckpointError(f"config.json: invalid quantization_config: {exc}") from exc
    weights = scheme.config_groups[moe_group].weights
    if weights is None or weights.num_bits != 4:
        found = None if weights is None else weights.num_bits
        raise CheckpointError(f"config.json: MoE group {moe_group!r} weights.num_bits is {found}; expected 4")
    return scheme, clip, moe_group


def build_quantization_config(activation_use_clip: bool, ignore: list[str],
                              quant_method: str = ACCEPTED_METHODS[0]) -> dict:
    """A W8A8 ``Linear`` group and a W4A8 ``MoEGMM`` group (``group_1``) carrying the clip flag.

    ``quant_method``: ``"compressed-tensors"`` or ``"modelslim"`` (sglang 0.5.7's NPU spelling).
    """
    if quant_method not in ACCEPTED_METHODS:
        raise ValueError(f"quant_method must be one of {ACCEPTED_METHODS}, got {quant_method!r}")
    qc = {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            LINEAR_GROUP: {"targets": ["Linear"], "weights": _weights(8), "input_activations": dict(_INT_TOKEN_DYNAMIC)},
            FALLBACK_GROUP: {"targets": [MOE_TARGET], "weights": _weights(4), "input_activations": dict(_INT_TOKEN_DYNAMIC)},
        },
        "ignore": sorted(ignore),
    }
    # Validate what we write with the same package that will read it.
    _validate_scheme(qc)
    qc["quant_method"] = quant_method
    qc["config_groups"][FALLBACK_GROUP][CLIP_KEY] = bool(activation_use_clip)
    return qc


class CompressedTensorsFormat(CheckpointFormat):
    """compressed-tensors with the activation clip (the cann-recipes-infer layout)."""

    name = "compressed-tensors"
    weights_prefix = WEIGHTS_PREFIX
    index_file = INDEX_FILE
    single_file = SINGLE_FILE
    shard_glob = "*.safetensors"
    marker = "config.json:quantization_config"
    carries_activation_clip = True
    quant_methods = ACCEPTED_METHODS

    def detect(self, directory: str | Path, config: dict | None = None) -> bool:
        """A ``quantization_config`` in ``config.json`` marks compressed-tensors."""
        if config is None:
            config = read_config(Path(directory))
        return "quantization_config" in config

    # ------------------------------------------------------------ metadata
    def read_metadata(self, directory: Path, config: dict) -> FormatMetadata:
        """Validate ``quantization_config`` (imports the compressed-tensors package)."""
        qc = config["quantization_config"]
        scheme, clip, moe_group = parse_quantization_config(qc)
        return FormatMetadata(activation_use_clip=clip, scheme=scheme, moe_group=moe_group,
                              quant_method=qc.get("quant_method"))

    def write_metadata(self, directory: Path, config: dict, types: dict[str, str], ignore: list[str],
                       options: WriteOptions, description_metadata: dict | None = None) -> dict:
        """``config.json`` with ``quantization_config`` (the ``ignore`` list: the float Linears)."""
        out = dict(config)
        out.pop("quantization_config", None)
        out["quantization_config"] = build_quantization_config(
            options.activation_use_clip, ignore, options.quant_method or ACCEPTED_METHODS[0]
        )
        return out

    def record_tensor(self, name: str, tensor: torch.Tensor, role: str, types: dict[str, str],
                      ignore: list[str]) -> None:
        """A Linear kept in float (a 2-D ``.weight``, not an embedding or a norm) goes into ``ignore``."""
        if role == FLOAT and tensor.dim() == 2 and name.endswith(".weight") \
                and "embed_tokens" not in name and "norm" not in name:
            ignore.append(name[: -len(".weight")])

    # ------------------------------------------------------------ tensors
    def expert_specs(self, proj: str, n: int, k: int, hidden: int, with_alpha: bool) -> dict[str, TensorSpec]:
        """weight int8 ``[N/2, K]``, weight_scale uint64/fp32 ``[N, 1]``, bias fp32 ``[N]``;
        with the clip the down projection adds alpha fp32 ``[]`` (or ``[1]``)."""
        specs = {
            "weight": TensorSpec((torch.int8,), ((n // 2, k),)),
            "weight_scale": TensorSpec(SCALE_DTYPES, ((n, 1),)),
            "bias": TensorSpec((torch.float32,), ((n,),)),
        }
        if proj == "down" and with_alpha:
            specs["alpha"] = TensorSpec((torch.float32,), ((), (1,)))
        return specs

    def expert_tensors(self, proj: str, packed: torch.Tensor, scale: torch.Tensor,
                       alpha: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """uint64 scales (fp32 bits in the low half), the kernel bias, and ``alpha`` if given."""
        n = 2 * packed.shape[0]
        scale = scale.to(torch.float32).reshape(n)
        out = {"weight": packed.contiguous(), "weight_scale": encode_scale_uint64(scale.reshape(n, 1)),
               "bias": kernel_bias_packed(packed, scale)}
        if proj == "down" and alpha is not None:
            out["alpha"] = alpha.to(torch.float32).reshape(()).clone()
        return out

    def kernel_bias_suffix(self, proj: str) -> str:
        return "bias"

    def load_alpha(self, down_prefix: str, get: TensorGetter, problems: list[str]) -> float | None:
        """``{down}.alpha``, which must lie in (0, 1]."""
        name = f"{down_prefix}.alpha"
        a = float(get(name).reshape(()))
        if not (0.0 < a <= 1.0):  # also false for NaN
            problems.append(f"tensor {name!r}: activation clip must lie in (0, 1], found {a!r}")
            return None
        return a

    def linear_specs(self, n: int, k: int) -> dict[str, TensorSpec]:
        return {
            "weight": TensorSpec((torch.int8,), ((n, k),)),
            "weight_scale": TensorSpec((torch.float32, torch.bfloat16), ((n, 1),)),
        }

    def linear_tensors(self, weight_q: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        n = weight_q.shape[0]
        return {"weight": weight_q.contiguous(), "weight_scale": scale.to(torch.float32).reshape(n, 1).clone()}


COMPRESSED_TENSORS = CompressedTensorsFormat()
"""The compressed-tensors (activation clip) format object."""
