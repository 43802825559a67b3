"""Baseline models built in memory from the source: W8A8 everywhere (int8 routed experts).

The W8A8 baseline answers "what does going from 8-bit to 4-bit experts cost?": the source
model with its routed experts replaced by int8 per-channel weights driven by per-token int8
activations (computed with the package's integer matmul, :mod:`w4a8moe.quant`), and the same
Linears W8A8 as the quantized checkpoint being compared. Routing and everything else stay
as transformers computes them.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from w4a8moe.formats import MoEModelConfig
from w4a8moe.models.export import default_w8a8_policy, moe_blocks
from w4a8moe.models.loading import W8A8LinearWithBias, use_gated_mlps
from w4a8moe.moe import GatedMLP, W8A8Linear
from w4a8moe.quant import (
    dynamic_quant_per_token,
    quantize_int8_per_channel,
    scaled_int_matmul,
    swiglu_clip_quant,
)


class Int8Experts(nn.Module):
    """Drop-in for a transformers 5 experts module (fused ``gate_up_proj`` / ``down_proj``).

    ``forward(hidden_states [M, H], top_k_index [M, k], top_k_weights [M, k])`` as the
    transformers module; each expert runs GMM1 (int8 x int8), SwiGLU in fp32 with per-token
    int8 re-quantization (no clip) and GMM2 (int8 x int8), outputs bf16 per expert.
    """

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.num_experts = experts.gate_up_proj.shape[0]
        w13, s13 = quantize_int8_per_channel(experts.gate_up_proj.detach())
        w2, s2 = quantize_int8_per_channel(experts.down_proj.detach())
        self.register_buffer("w13", w13)
        self.register_buffer("w13_scale", s13)
        self.register_buffer("w2", w2)
        self.register_buffer("w2_scale", s2)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        x_q, x_scale = dynamic_quant_per_token(hidden_states.to(torch.bfloat16))
        out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        for expert in top_k_index.unique().tolist():
            tokens, slot = torch.where(top_k_index == expert)
            gate_up = scaled_int_matmul(x_q[tokens], x_scale[tokens], self.w13[expert], self.w13_scale[expert])
            h_q, h_scale = swiglu_clip_quant(gate_up, 1.0)
            y = scaled_int_matmul(h_q, h_scale, self.w2[expert], self.w2_scale[expert])
            out.index_add_(0, tokens, y.to(torch.float32) * top_k_weights[tokens, slot].to(torch.float32).unsqueeze(-1))
        return out.to(hidden_states.dtype)


def w8a8_linear_from(linear: nn.Linear) -> nn.Module:
    """A W8A8 dynamic replacement of ``linear`` (its bias, if any, kept in bf16)."""
    q, s = quantize_int8_per_channel(linear.weight.detach())
    if linear.bias is None:
        return W8A8Linear(q, s)
    return W8A8LinearWithBias(q, s, linear.bias.detach().to(torch.bfloat16))


def w8a8_baseline(source: nn.Module, w8a8_linears: Iterable[str] | None = None) -> nn.Module:
    """A copy of ``source`` with int8 routed experts and W8A8 Linears.

    ``w8a8_linears`` names the Linears (module paths) to make W8A8 - pass those the compared
    checkpoint holds as int8, so that the two differ in the experts only; ``None`` applies the
    upstream policy (:func:`~w4a8moe.models.export.default_w8a8_policy`).
    """
    model = copy.deepcopy(source)
    for block in moe_blocks(model).values():
        block.experts = Int8Experts(block.experts)
    names = set(w8a8_linears) if w8a8_linears is not None else {
        n for n, m in model.named_modules() if default_w8a8_policy(n, m)
    }
    for name in sorted(names):
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name!r} is not a Linear in the source model")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, w8a8_linear_from(module))
    use_gated_mlps(model)  # W8A8 MLPs round their activation once, as in the loaded W4A8 model
    return model.eval()


def w8a8_linear_names(model: nn.Module, model_config: MoEModelConfig) -> list[str]:
    """The source-model paths of the Linears a loaded W4A8 model holds as W8A8.

    Shared-expert projections live at ``...mlp.moe.shared.<proj>`` in the loaded model and at
    ``...mlp.<shared>.<proj>`` (family-specific) in the transformers source.
    """
    names = []
    marker = ".moe.shared."
    for loaded_name, module in model.named_modules():
        if not isinstance(module, W8A8Linear):
            continue
        for name in GatedMLP.source_projection_names(loaded_name):
            if marker in name:
                block, _, proj = name.partition(marker)
                names.append(f"{block}.{model_config.names.shared}.{proj}")
            else:
                names.append(name)
    return sorted(names)
