"""The reference backend: plain torch, exact integer accumulation, one expert at a time.

Unpacked weights exist only transiently, one expert at a time, never as resident copies.
"""

from __future__ import annotations

import torch

from w4a8moe.kernels.base import PackedExpertWeights, combine_rows, register_backend
from w4a8moe.quant import (
    dynamic_quant_per_token,
    int8_matmul_int32,
    scaled_int_matmul,
    swiglu_clip_quant,
    unpack_int4_pairs,
)


class ReferenceBackend:
    """Exact and slow: the behaviour every other backend is tested against."""

    name = "reference"

    def prepare(self, weights: PackedExpertWeights) -> PackedExpertWeights:
        return weights

    def grouped_forward(
        self,
        prepared: PackedExpertWeights,
        x_q: torch.Tensor,
        x_scale: torch.Tensor,
        token_ids: torch.Tensor,
        expert_offsets: torch.Tensor,
        alpha: torch.Tensor,
    ) -> torch.Tensor:
        out = torch.empty((token_ids.shape[0], prepared.hidden_size), dtype=torch.bfloat16, device=x_q.device)
        offsets = expert_offsets.tolist()
        for e in range(prepared.num_experts):
            start, end = offsets[e], offsets[e + 1]
            if start == end:
                continue
            rows = token_ids[start:end]
            gate_up = scaled_int_matmul(
                x_q[rows], x_scale[rows], unpack_int4_pairs(prepared.w13[e]), prepared.w13_scale[e]
            )
            h_q, h_scale = swiglu_clip_quant(gate_up, alpha[e])
            out[start:end] = scaled_int_matmul(h_q, h_scale, unpack_int4_pairs(prepared.w2[e]), prepared.w2_scale[e])
        return out

    def combined_forward(
        self,
        prepared: PackedExpertWeights,
        x_q: torch.Tensor,
        x_scale: torch.Tensor,
        token_ids: torch.Tensor,
        expert_offsets: torch.Tensor,
        alpha: torch.Tensor,
        row_weights: torch.Tensor,
    ) -> torch.Tensor:
        rows = self.grouped_forward(prepared, x_q, x_scale, token_ids, expert_offsets, alpha)
        return combine_rows(rows, token_ids, row_weights, x_q.shape[0])

    def gate_up_rows(self, prepared: PackedExpertWeights, x_q: torch.Tensor, x_scale: torch.Tensor,
                     token_ids: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
        out = torch.empty((token_ids.shape[0], 2 * prepared.intermediate_size), dtype=torch.bfloat16)
        offsets = expert_offsets.tolist()
        for e in range(prepared.num_experts):
            start, end = offsets[e], offsets[e + 1]
            if start < end:
                rows = token_ids[start:end]
                out[start:end] = scaled_int_matmul(x_q[rows], x_scale[rows], unpack_int4_pairs(prepared.w13[e]),
                                                   prepared.w13_scale[e])
        return out

    def down_rows_int32(self, prepared: PackedExpertWeights, h_q: torch.Tensor,
                        expert_offsets: torch.Tensor) -> torch.Tensor:
        out = torch.empty((h_q.shape[0], prepared.hidden_size), dtype=torch.int32)
        offsets = expert_offsets.tolist()
        for e in range(prepared.num_experts):
            start, end = offsets[e], offsets[e + 1]
            if start < end:
                out[start:end] = int8_matmul_int32(h_q[start:end], unpack_int4_pairs(prepared.w2[e]))
        return out

    def int8_linear_int32(self, prepared: tuple[torch.Tensor, torch.Tensor], x_q: torch.Tensor) -> torch.Tensor:
        return int8_matmul_int32(x_q, prepared[0])

    def quantize_per_token(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return dynamic_quant_per_token(x)

    def prepare_int8_linear(self, weight_q: torch.Tensor, weight_scale: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        return weight_q, weight_scale

    def int8_linear(self, prepared: tuple[torch.Tensor, torch.Tensor], x_q: torch.Tensor,
                    x_scale: torch.Tensor) -> torch.Tensor:
        return scaled_int_matmul(x_q, x_scale, *prepared)

    def int_matmul(self, a_q: torch.Tensor, b_q: torch.Tensor) -> torch.Tensor:
        """The float64 products of :func:`w4a8moe.quant.int8_matmul_int32` (exact, slow)."""
        return int8_matmul_int32(a_q, b_q)


register_backend("reference", ReferenceBackend, priority=100, devices=("cpu", "cuda"))
