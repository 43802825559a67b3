"""The ``w4a8moe`` quantization config: which vLLM layer runs which method.

Detected automatically for compressed-tensors checkpoints whose MoE group targets
``MoEGMM`` (``quant_method`` ``"compressed-tensors"`` or ``"modelslim"``); an AscendV1
checkpoint (``quant_model_description.json``) needs ``quantization="w4a8moe"``.

Each worker opens the checkpoint with the project's reader (:func:`w4a8moe.open_checkpoint`,
full validation by default: names, dtypes, shapes, scales, int4 ranges, kernel biases
against the unsplit sums, clips, NaN), so a defective checkpoint stops the engine with the
reader's error naming the tensor. ``$W4A8MOE_VLLM_VALIDATE=structure`` checks headers only.
``$W4A8MOE_APPLY_ALPHA=0`` ignores the activation clips, as upstream sglang does.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from w4a8moe.errors import CheckpointError
from w4a8moe.integrations.vllm import format_adapter

from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

NAME = "w4a8moe"
APPLY_ALPHA_ENV = "W4A8MOE_APPLY_ALPHA"
VALIDATE_ENV = "W4A8MOE_VLLM_VALIDATE"

# vLLM's fused projections -> the checkpoint's projections (models may add their own).
DEFAULT_PACKED_MODULES = {
    "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "gate_up_proj": ["gate_proj", "up_proj"],
    "fused_qkv_a_proj": ["q_a_proj", "kv_a_proj_with_mqa"],
}

_CHECKPOINTS: dict[str, object] = {}


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"${name} must be 0 or 1, got {value!r}")


def open_validated(path: str):
    """The checkpoint at ``path``, opened and validated once per process."""
    from w4a8moe.formats import open_checkpoint

    if path not in _CHECKPOINTS:
        _CHECKPOINTS[path] = open_checkpoint(path, validate=os.environ.get(VALIDATE_ENV, "full"))
    return _CHECKPOINTS[path]


class W4A8MoEConfig(QuantizationConfig):
    """W4A8 routed experts with the activation clip, W8A8 Linears, the rest unquantized."""

    def __init__(self, fmt, apply_alpha: bool = True):  # fmt: a w4a8moe.formats.CheckpointFormat
        super().__init__()
        self.fmt = fmt
        self.apply_alpha = apply_alpha
        self._checkpoint = None

    def __repr__(self) -> str:
        return f"W4A8MoEConfig(format={self.fmt!r}, apply_alpha={self.apply_alpha})"

    def get_name(self) -> str:
        return NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return [format_adapter.DESCRIPTION_FILE]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "W4A8MoEConfig":
        apply_alpha = config.get("w4a8moe_apply_alpha") if isinstance(config, dict) else None
        if apply_alpha is None:
            apply_alpha = _env_flag(APPLY_ALPHA_ENV, True)
        return cls(format_adapter.format_of_quant_config(config), bool(apply_alpha))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> str | None:
        if user_quant not in (None, NAME):
            return None
        return NAME if format_adapter.claims_quant_config(hf_quant_cfg) else None

    # ------------------------------------------------------------------ per process
    @property
    def checkpoint(self):
        """The validated :class:`~w4a8moe.formats.Checkpoint` of the model being loaded."""
        if self._checkpoint is None:
            from vllm.config import get_current_vllm_config

            path = get_current_vllm_config().model_config.model
            if not os.path.isdir(path):
                raise CheckpointError(f"w4a8moe: the model {path!r} is not a local checkpoint folder")
            self._checkpoint = open_validated(path)
            if self._checkpoint.format != self.fmt:
                raise CheckpointError(f"{path}: the quantization config says {self.fmt}, the folder holds "
                                      f"{self._checkpoint.format}")
        return self._checkpoint

    def parallel_group(self):
        """This rank in the tensor-parallel group (which is also the expert-parallel group)."""
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size, get_tp_group

        from w4a8moe.integrations.vllm.ops import ParallelGroup

        world = get_tensor_model_parallel_world_size()
        if world == 1:
            return ParallelGroup()
        return ParallelGroup(get_tensor_model_parallel_rank(), world, get_tp_group().cpu_group)

    def _shard_names(self, prefix: str) -> list[str]:
        base, _, leaf = prefix.rpartition(".")
        packed = {**DEFAULT_PACKED_MODULES, **(self.packed_modules_mapping or {})}
        return [f"{base}.{part}" for part in packed.get(leaf, [leaf])]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        from vllm.model_executor.layers.fused_moe import RoutedExperts
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

        ckpt = self.checkpoint
        if isinstance(layer, LinearBase):
            shards = self._shard_names(prefix)
            infos = ckpt.reader.infos
            int8 = [f"{s}.weight" in infos and infos[f"{s}.weight"].dtype == torch.int8 for s in shards]
            if all(int8):
                from w4a8moe.integrations.vllm.linear_method import W8A8LinearMethod

                return W8A8LinearMethod(self, prefix, shards)
            if any(int8):
                raise CheckpointError(f"{ckpt.path}: the fused projection {prefix!r} mixes int8 and float parts: {shards}")
            return UnquantizedLinearMethod()
        if isinstance(layer, RoutedExperts):
            match = re.search(r"layers\.(\d+)\.", prefix)
            if match is None or int(match.group(1)) not in ckpt.moe_layers:
                raise CheckpointError(f"{ckpt.path}: vLLM builds a MoE layer {prefix!r}, but the checkpoint has W4A8 "
                                      f"experts for layers {ckpt.moe_layers}")
            from w4a8moe.integrations.vllm.moe_method import W4A8MoEMethod

            return W4A8MoEMethod(layer.moe_config, self, int(match.group(1)), prefix)
        return None
