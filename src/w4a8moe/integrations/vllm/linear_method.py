"""W8A8-dynamic Linears (attention, dense MLPs, shared experts) on the project's int8 kernel.

vLLM's parameter classes do the tensor-parallel narrowing and the stacking of fused
projections (``qkv_proj``, ``gate_up_proj``); every shard a parameter receives is recorded,
so a projection vLLM never fed is refused by name after loading. A row-parallel Linear
under tensor parallelism agrees on each token's max over the whole K before quantizing
(:func:`w4a8moe.kernels.split.split_int8_linear`), so its output has the single-rank bits.
"""

from __future__ import annotations

import torch

from w4a8moe.errors import CheckpointError
from w4a8moe.integrations.vllm import ops
from w4a8moe.kernels import get_backend
from w4a8moe.kernels.base import holds_int8_weight

from vllm.model_executor.layers.linear import LinearMethodBase, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.parameter import ChannelQuantScaleParameter, ModelWeightParameter


class W8A8LinearMethod(LinearMethodBase):
    """One W8A8 Linear; ``shard_names`` are the checkpoint names of its (fused) projections."""

    def __init__(self, quant_config, prefix: str, shard_names: list[str]):
        self.quant_config = quant_config
        self.prefix = prefix
        self.shard_names = shard_names
        self.fmt = quant_config.checkpoint.format
        self.received: set[tuple[str, object]] = set()

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        weight_loader = extra_weight_attrs["weight_loader"]
        n = sum(output_partition_sizes)
        layer.logical_widths = output_partition_sizes
        params = {"weight": ModelWeightParameter(
            data=torch.empty(n, input_size_per_partition, dtype=torch.int8), input_dim=1, output_dim=0,
            weight_loader=self._recording(weight_loader, "weight"))}
        for suffix in self.fmt.linear_specs(2, 2):
            if suffix != "weight":
                # fp32 explicitly: parameters without a dtype become the model's bf16.
                params[suffix] = ChannelQuantScaleParameter(
                    data=torch.empty((n, 1), dtype=torch.float32), output_dim=0,
                    weight_loader=self._recording(weight_loader, suffix))
        for name, p in params.items():
            layer.register_parameter(name, p)
        self.out_features = n

    def _recording(self, weight_loader, suffix: str):
        def load(param, loaded_weight: torch.Tensor, *args, **kwargs):
            shard = args[0] if args else kwargs.get("loaded_shard_id")
            self.received.add((suffix, shard))
            if suffix == "weight_scale" and loaded_weight.dtype == torch.uint64:
                loaded_weight = self.fmt.decode_scale(loaded_weight).reshape(-1, 1)
            return weight_loader(param, loaded_weight, *args, **kwargs)
        return load

    def _expected_shards(self, layer) -> list[tuple[object, str]]:
        if isinstance(layer, QKVParallelLinear):
            return list(zip(("q", "k", "v"), self.shard_names))
        if len(self.shard_names) > 1:
            return list(enumerate(self.shard_names))
        return [(None, self.shard_names[0])]

    def process_weights_after_loading(self, layer) -> None:
        missing = [f"{name}.{suffix}" for shard, name in self._expected_shards(layer)
                   for suffix in self.fmt.linear_specs(2, 2) if (suffix, shard) not in self.received]
        if missing:
            raise CheckpointError(f"{self.quant_config.checkpoint.path}: vLLM loaded no value for "
                                  + ", ".join(repr(m) for m in missing))
        scale = layer.weight_scale.data.reshape(-1).to(torch.float32)
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise CheckpointError(f"{self.prefix}.weight_scale: scales must be finite and > 0 after loading")
        if hasattr(layer, "weight_offset") and bool((layer.weight_offset.data != 0).any()):
            raise CheckpointError(f"{self.prefix}.weight_offset: expected all zeros (symmetric W8A8)")
        backend = get_backend()
        row_parallel = ops.ParallelGroup()
        if isinstance(layer, RowParallelLinear) and layer.tp_size > 1:
            row_parallel = self.quant_config.parallel_group()
        ops.LINEAR_LAYERS[self.prefix] = ops.LinearState(
            backend=backend, prepared=backend.prepare_int8_linear(layer.weight.data.contiguous(), scale),
            weight_scale=scale.clone(), out_features=self.out_features, row_parallel=row_parallel)
        if holds_int8_weight(backend):
            # The backend's layout is the only copy it needs (see W8A8Linear): drop the loaded one.
            layer.weight.data = torch.empty(0, dtype=torch.int8)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.ops.w4a8moe.int8_linear(x, self.prefix, self.out_features).to(x.dtype)
        return y if bias is None else y + bias
