"""W8A8 dynamic Linear: int8 per-channel weights, per-token int8 activations."""

from __future__ import annotations

import torch
from torch import nn

from w4a8moe.quant import w8a8_linear


class W8A8Linear(nn.Module):
    """A bias-free Linear whose weight is int8 ``[N, K]`` with fp32 scales ``[N]``."""

    def __init__(self, weight_q: torch.Tensor, weight_scale: torch.Tensor):
        super().__init__()
        if weight_q.dtype != torch.int8 or weight_q.dim() != 2:
            raise ValueError(f"W8A8Linear needs an int8 [N, K] weight, got {weight_q.dtype} {tuple(weight_q.shape)}")
        self.register_buffer("weight", weight_q)
        self.register_buffer("weight_scale", weight_scale.reshape(-1).to(torch.float32))
        self.in_features = weight_q.shape[1]
        self.out_features = weight_q.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w8a8_linear(x, self.weight, self.weight_scale, out_dtype=torch.bfloat16)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w8a8_dynamic"
