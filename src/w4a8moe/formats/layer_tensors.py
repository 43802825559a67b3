"""One MoE layer's tensors, float and quantized, and the quantization between them.

The converter, the writer, the checkpoint reader and the runtime layer all pass these
objects around, so that the math lives in :mod:`w4a8moe.quant` and only there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from w4a8moe.formats.model_config import EXPERT_PROJECTIONS
from w4a8moe.quant import pack_int4_pairs, quantize_int4_per_channel, quantize_int8_per_channel

SHARED_FORMATS = ("w8a8", "bf16")


@dataclass
class FloatMoELayer:
    """A MoE block in float, as a source model holds it.

    ``experts[p]`` is ``[E, N, K]`` for ``p`` in gate/up/down (gate/up: ``[E, I, H]``, down:
    ``[E, H, I]``); ``alpha`` ``[E]`` the activation clips (``None``: all 1); ``weight_clip[p]``
    ``[E, N]`` the weight clip factors (``None``: all 1). ``shared[p]`` is ``[N, K]``.
    """

    router_weight: torch.Tensor
    experts: dict[str, torch.Tensor]
    correction_bias: torch.Tensor | None = None
    shared: dict[str, torch.Tensor] | None = None
    shared_expert_gate: torch.Tensor | None = None
    alpha: torch.Tensor | None = None
    weight_clip: dict[str, torch.Tensor] | None = None


@dataclass
class QuantizedMoELayer:
    """A MoE block as a W4A8 checkpoint holds it.

    ``packed[p]`` int8 ``[E, N/2, K]``; ``scale[p]`` fp32 ``[E, N]``; ``alpha`` fp32 ``[E]``;
    ``shared[p]`` is ``(weight, scale)``: int8 ``[N, K]`` with fp32 ``[N]`` (W8A8) or a float
    weight with ``None``.
    """

    router_weight: torch.Tensor
    packed: dict[str, torch.Tensor]
    scale: dict[str, torch.Tensor]
    alpha: torch.Tensor
    correction_bias: torch.Tensor | None = None
    shared: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None
    shared_expert_gate: torch.Tensor | None = None
    extras: dict[str, object] = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return self.packed["gate"].shape[0]


def quantize_moe_layer(layer: FloatMoELayer, shared_format: str = "w8a8") -> QuantizedMoELayer:
    """Quantize the routed experts to int4 (with their weight clips) and the shared expert."""
    if shared_format not in SHARED_FORMATS:
        raise ValueError(f"shared_format must be one of {SHARED_FORMATS}, got {shared_format!r}")
    packed: dict[str, torch.Tensor] = {}
    scale: dict[str, torch.Tensor] = {}
    for proj in EXPERT_PROJECTIONS:
        clip = layer.weight_clip.get(proj) if layer.weight_clip else None
        q, s = quantize_int4_per_channel(layer.experts[proj], clip)
        packed[proj] = pack_int4_pairs(q)
        scale[proj] = s
    num_experts = packed["gate"].shape[0]
    alpha = layer.alpha if layer.alpha is not None else torch.ones(num_experts)
    shared = None
    if layer.shared is not None:
        shared = {}
        for proj in EXPERT_PROJECTIONS:
            w = layer.shared[proj]
            shared[proj] = quantize_int8_per_channel(w) if shared_format == "w8a8" else (w.to(torch.bfloat16), None)
    return QuantizedMoELayer(
        router_weight=layer.router_weight,
        packed=packed,
        scale=scale,
        alpha=alpha.to(torch.float32),
        correction_bias=layer.correction_bias,
        shared=shared,
        shared_expert_gate=layer.shared_expert_gate,
    )
