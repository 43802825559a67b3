"""The fused-MoE method: W4A8 routed experts in vLLM's three phases on the project's kernels.

- ``create_weights``: this rank's experts as the project's packed layout (``w13`` int8
  ``[E, I/tp, H]``, gate then up, in output-channel pairs; ``w2`` int8 ``[E, H/2, I/tp]``;
  fp32 scales; the clips ``w2_alpha``) plus a record-only parameter for every other tensor
  the format stores per expert (kernel biases, offsets), which the checkpoint's own
  validation has already checked against the unsplit sums.
- The weight loader narrows to this rank's share, decodes scales and records every tensor
  it receives: vLLM reports no missing weights for quantized models, so
  ``process_weights_after_loading`` refuses a layer any of whose local tensors never
  arrived, naming it; then the backend re-lays the experts once.
- The method is *monolithic*: vLLM hands ``apply_monolithic`` its router logits, which are
  ignored; the ``w4a8moe::moe_experts`` op (:mod:`.ops`) routes with the project's fp32
  routing (SPEC 3) from the router tensors read and value-checked from the checkpoint here
  (why not vLLM's logits: see :mod:`.ops`), after checking that vLLM routes this layer the
  same way.
"""

from __future__ import annotations

import torch

from w4a8moe.errors import CheckpointError, ConfigError
from w4a8moe.formats.model_config import EXPERT_PROJECTIONS, RoutingConfig
from w4a8moe.integrations.vllm import format_adapter, ops
from w4a8moe.kernels import PackedExpertWeights, get_backend

from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase

_SHARD_PROJ = {"w1": "gate", "w3": "up", "w2": "down"}
_PARAM_PREFIX = {"gate": "w13", "up": "w13", "down": "w2"}


def check_routing_matches(prefix: str, layer, routing: RoutingConfig) -> None:
    """Raise :class:`ConfigError` unless vLLM's routing options for the MoE layer ``layer``
    (a ``RoutedExperts``) are those of the checkpoint's ``routing``: the plugin's op routes by
    the latter, and a mismatch would serve another model than vLLM built."""
    noaux = routing.method == "noaux_tc"
    found = {"top_k": layer.top_k, "renormalize": layer.renormalize, "sigmoid scores": layer.scoring_func == "sigmoid",
             "custom routing function": layer.custom_routing_function is not None}
    expected = {"top_k": routing.top_k, "renormalize": routing.norm_topk_prob, "sigmoid scores": noaux,
                "custom routing function": False}
    if noaux:
        found["groups"], expected["groups"] = (layer.num_expert_group, layer.topk_group), (routing.n_group,
                                                                                           routing.topk_group)
    # vLLM folds the factor into the weights (and the op then does) or scales the output itself.
    if layer.routed_scaling_factor not in (1.0, routing.routed_scaling_factor):
        found["routed_scaling_factor"], expected["routed_scaling_factor"] = (layer.routed_scaling_factor,
                                                                             routing.routed_scaling_factor)
    wrong = [f"{k} {found[k]!r} (expected {expected[k]!r})" for k in found if found[k] != expected[k]]
    if wrong:
        raise ConfigError(f"{prefix}: vLLM routes this MoE layer unlike the checkpoint's config.json ({routing}): "
                          + ", ".join(wrong))


class W4A8MoEMethod(FusedMoEMethodBase):
    """Routed experts of one MoE layer (see the module docstring)."""

    def __init__(self, moe, quant_config, layer_index: int, prefix: str):
        super().__init__(moe)
        self.quant_config = quant_config
        self.layer_index = layer_index
        self.prefix = prefix
        self.fmt = quant_config.checkpoint.format
        self.with_alpha = quant_config.checkpoint.activation_use_clip
        self.received: set[tuple[int, str, str]] = set()

    # vLLM may pad I for its own kernels; the packed layout must keep the checkpoint's sizes.
    def maybe_roundup_sizes(self, hidden_size, intermediate_size_per_partition, act_dtype, moe_parallel_config):
        return hidden_size, intermediate_size_per_partition

    def get_fused_moe_quant_config(self, layer):
        return None

    @property
    def is_monolithic(self) -> bool:
        return True

    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        inter = intermediate_size_per_partition
        if inter % 2 or hidden_size % 2:
            raise CheckpointError(
                f"{self.prefix}: the int4 pair layout needs an even I per rank and an even H; got I/tp={inter}, "
                f"H={hidden_size} (choose a tensor-parallel size that divides I/2)")
        self.num_local, self.hidden, self.inter = num_experts, hidden_size, inter
        tensors = {
            "w13_weight": torch.zeros((num_experts, inter, hidden_size), dtype=torch.int8),
            "w13_weight_scale": torch.zeros((num_experts, 2 * inter), dtype=torch.float32),
            "w2_weight": torch.zeros((num_experts, hidden_size // 2, inter), dtype=torch.int8),
            "w2_weight_scale": torch.zeros((num_experts, hidden_size), dtype=torch.float32),
        }
        if self.with_alpha:
            tensors["w2_alpha"] = torch.ones(num_experts, dtype=torch.float32)
        for proj in EXPERT_PROJECTIONS:
            for suffix in format_adapter.expert_suffixes(self.fmt, proj, self.with_alpha):
                tensors.setdefault(f"{_PARAM_PREFIX[proj]}_{suffix}", torch.empty(0))  # record only
        for name, data in tensors.items():
            param = torch.nn.Parameter(data, requires_grad=False)
            param.weight_loader = self._make_loader(layer, name)
            layer.register_parameter(name, param)

    def _checkpoint_name(self, expert: int, proj: str, suffix: str) -> str:
        names = self.quant_config.checkpoint.model_config.names
        return f"{names.expert_weight(self.layer_index, expert, proj)}.{suffix}"

    def _make_loader(self, layer, param_name: str):
        suffix = param_name.split("_", 1)[1]

        def load(param, loaded_weight: torch.Tensor, weight_name: str = "", shard_id: str = "",
                 expert_id: int = 0, return_success: bool = False):
            local = layer._map_global_expert_id_to_local_expert_id(expert_id)
            if local == -1:
                return False if return_success else None
            proj = _SHARD_PROJ[shard_id]
            self._store(param, suffix, proj, local, loaded_weight, self._checkpoint_name(expert_id, proj, suffix),
                        layer.moe_config.moe_parallel_config)
            self.received.add((expert_id, proj, suffix))
            return True if return_success else None

        return load

    def _store(self, param, suffix: str, proj: str, local: int, t: torch.Tensor, name: str, parallel) -> None:
        tp_rank, tp_size = parallel.tp_rank, parallel.tp_size
        inter, hidden = self.inter, self.hidden
        if param.numel() == 0:
            return  # record only: validated on disk with the unsplit sums
        if suffix == "alpha":
            param.data[local] = t.to(torch.float32).reshape(())
            return
        if suffix == "weight_scale":
            try:
                s = self.fmt.decode_scale(t)
            except ValueError as exc:
                raise CheckpointError(f"tensor {name!r}: {exc}") from exc
            n = hidden if proj == "down" else inter * tp_size
            if s.numel() != n:
                raise CheckpointError(f"tensor {name!r}: expected {n} scales, found {list(t.shape)}")
            if proj == "down":
                param.data[local] = s
            else:
                col = 0 if proj == "gate" else inter
                param.data[local, col:col + inter] = s[tp_rank * inter:(tp_rank + 1) * inter]
            return
        if suffix == "weight":
            if proj == "down":
                if tuple(t.shape) != (hidden // 2, inter * tp_size):
                    raise CheckpointError(f"tensor {name!r}: expected int8 {[hidden // 2, inter * tp_size]}, "
                                          f"found {list(t.shape)}")
                param.data[local] = t[:, tp_rank * inter:(tp_rank + 1) * inter]
            else:
                half = inter // 2
                if tuple(t.shape) != (half * tp_size, hidden):
                    raise CheckpointError(f"tensor {name!r}: expected int8 {[half * tp_size, hidden]}, "
                                          f"found {list(t.shape)}")
                row = 0 if proj == "gate" else half
                param.data[local, row:row + half] = t[tp_rank * half:(tp_rank + 1) * half]
            return
        raise CheckpointError(f"tensor {name!r}: the plugin has no place for suffix {suffix!r}")

    def process_weights_after_loading(self, layer) -> None:
        expert_map = getattr(layer, "expert_map", None)
        num_global = layer.moe_config.num_experts
        local_experts = ([e for e in range(num_global) if int(expert_map[e]) >= 0]
                         if expert_map is not None else list(range(num_global)))
        missing = [self._checkpoint_name(e, proj, suffix)
                   for e in local_experts for proj in EXPERT_PROJECTIONS
                   for suffix in format_adapter.expert_suffixes(self.fmt, proj, self.with_alpha)
                   if (e, proj, suffix) not in self.received]
        if missing:
            raise CheckpointError(
                f"{self.quant_config.checkpoint.path}: vLLM loaded no value for {len(missing)} tensor(s) of MoE layer "
                f"{self.layer_index}: " + ", ".join(repr(n) for n in missing[:10]))
        for name in ("w13_weight_scale", "w2_weight_scale"):
            s = getattr(layer, name).data
            if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
                raise CheckpointError(f"{self.prefix}.{name}: scales must be finite and > 0 after loading")
        routing = self.quant_config.checkpoint.model_config.routing
        check_routing_matches(self.prefix, layer, routing)
        router_weight, correction_bias = self.quant_config.checkpoint.load_router(self.layer_index)
        backend = get_backend()
        weights = PackedExpertWeights(layer.w13_weight.data, layer.w13_weight_scale.data, layer.w2_weight.data,
                                      layer.w2_weight_scale.data)
        prepared = backend.prepare(weights)
        alpha = layer.w2_alpha.data.clone() if self.with_alpha else torch.ones(self.num_local)
        if not self.quant_config.apply_alpha:
            alpha = torch.ones_like(alpha)
        parallel = layer.moe_config.moe_parallel_config
        group = self.quant_config.parallel_group()
        ops.MOE_LAYERS[self.prefix] = ops.MoEState(
            router_weight=router_weight.to(torch.float32),
            correction_bias=correction_bias,
            routing=routing,
            weight_scale=float(layer.routed_scaling_factor),
            backend=backend,
            prepared=prepared,
            w2_scale=layer.w2_weight_scale.data.clone(),
            alpha=alpha,
            num_global_experts=num_global,
            expert_map=expert_map.to(torch.int64).clone() if (expert_map is not None and parallel.ep_size > 1) else None,
            tp=group if parallel.tp_size > 1 else ops.ParallelGroup(),
            ep=group if parallel.ep_size > 1 else ops.ParallelGroup(),
            group=group,
        )
        if not isinstance(prepared, PackedExpertWeights):
            # The backend holds the only copy it needs (4 bits per weight): drop the loaded layout.
            for name in ("w13_weight", "w2_weight"):
                getattr(layer, name).data = torch.empty(0, dtype=torch.int8)

    def apply_monolithic(self, layer, x: torch.Tensor, router_logits: torch.Tensor,
                         input_ids: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.w4a8moe.moe_experts(x, self.prefix).to(x.dtype)
