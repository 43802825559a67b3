"""A quantized MoE layer's output error on the calibration tokens, accumulated expert by expert.

The converter reports ``||y_q - y||^2 / ||y||^2`` of the whole quantized MoE block (RTN and
learned) against the source block's output. Building the quantized layer for that would
hold every expert's packed weights at once (22 MB per DeepSeek-V3 expert, twice); instead
each expert's rows are added as the expert is quantized, by the fastest CPU backend (the
native kernel, bit-exact against the reference backend, which runs where it cannot build)
and in the order :func:`w4a8moe.kernels.base.combine_rows` defines (experts in increasing
index onto fp32 zeros), so the result has the same bits as
``W4A8MoE.from_quantized(layer, backend="reference")(x)``.
"""

from __future__ import annotations

import torch

from w4a8moe.formats.model_config import RoutingConfig
from w4a8moe.kernels import ExpertBackend, PackedExpertWeights, get_backend
from w4a8moe.kernels.reference import ReferenceBackend
from w4a8moe.moe import select_experts
from w4a8moe.moe.layer import shared_expert_from_quantized


def _exact_cpu_backend() -> ExpertBackend:
    """The native CPU kernel, else the reference backend: whatever ``$W4A8MOE_BACKEND`` names
    for the model, the report's bits are those of the reference."""
    try:
        return get_backend("cpu")
    except RuntimeError:  # the kernel cannot be built here (one warning was given)
        return ReferenceBackend()


class StreamedMoEOutput:
    """The W4A8 MoE block's output on ``x`` ``[M, H]``, one expert at a time.

    ``add_expert(e, packed, scale, alpha)`` for the experts in increasing order (any may be
    skipped: an expert no token is routed to adds nothing), then :meth:`finish`.
    """

    def __init__(self, x: torch.Tensor, router_weight: torch.Tensor, routing: RoutingConfig,
                 correction_bias: torch.Tensor | None):
        self._backend = _exact_cpu_backend()
        self.routing = routing
        self.x = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        # As W4A8MoE.route: fp32 logits of the bf16 input against the fp32 router.
        logits = torch.nn.functional.linear(self.x.to(torch.float32), router_weight.to(torch.float32))
        bias = correction_bias.to(torch.float32) if correction_bias is not None else None
        weights, ids = select_experts(logits, routing, bias)
        self.x_q, self.x_scale = self._backend.quantize_per_token(self.x)
        k = ids.shape[1]
        flat = ids.reshape(-1)
        self._flat_weights = weights.reshape(-1)
        self._flat = flat
        self._k = k
        self._last = -1
        self.sum = torch.zeros((self.x.shape[0], self.x.shape[1]), dtype=torch.float32)

    def rows_of(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token indices routed to ``expert`` (increasing) and their routing weights."""
        slots = torch.nonzero(self._flat == expert).reshape(-1)
        return torch.div(slots, self._k, rounding_mode="floor"), self._flat_weights[slots]

    def add_expert(self, expert: int, packed: dict[str, torch.Tensor], scale: dict[str, torch.Tensor],
                   alpha: float | torch.Tensor) -> None:
        """Add ``expert``'s weighted rows (packed int8 ``[N/2, K]``, fp32 scales ``[N]`` per projection)."""
        if expert <= self._last:
            raise ValueError(f"experts must be added in increasing order: {expert} after {self._last}")
        self._last = expert
        token_ids, row_weights = self.rows_of(expert)
        if token_ids.numel() == 0:
            return
        weights = PackedExpertWeights(
            torch.cat((packed["gate"], packed["up"]), dim=0)[None],
            torch.cat((scale["gate"].reshape(-1), scale["up"].reshape(-1))).to(torch.float32)[None],
            packed["down"][None],
            scale["down"].reshape(-1).to(torch.float32)[None],
        )
        offsets = torch.tensor([0, token_ids.numel()], dtype=torch.int64)
        alpha_t = torch.as_tensor(alpha, dtype=torch.float32).reshape(1)
        prepared = self._backend.prepare(weights)
        rows = self._backend.grouped_forward(prepared, self.x_q, self.x_scale, token_ids, offsets, alpha_t)
        self.sum.index_add_(0, token_ids, rows.to(torch.float32) * row_weights.to(torch.float32).reshape(-1, 1))

    def finish(self, shared: dict | None, shared_expert_gate: torch.Tensor | None) -> torch.Tensor:
        """The block's bf16 output ``[M, H]``: scaled routed sum plus the shared expert, as W4A8MoE.forward."""
        out = self.sum.mul_(self.routing.routed_scaling_factor)
        module = shared_expert_from_quantized(shared, shared_expert_gate)
        if module is not None:
            out.add_(module(self.x).to(torch.float32))
        return out.to(torch.bfloat16)
