"""The runtime MoE layer: routing, packed W4A8 experts, shared expert (gated MLP), W8A8 linears."""

from w4a8moe.moe.routing import (
    ExpertRows,
    RoutingConfig,
    grouped_top_k,
    route,
    route_noaux_tc,
    route_softmax_topk,
    select_experts,
    sort_rows_by_expert,
)
from w4a8moe.moe.linear import W8A8Linear
from w4a8moe.moe.layer import GatedMLP, W4A8MoE, PackedExperts, SharedExpert

__all__ = [
    "ExpertRows",
    "RoutingConfig",
    "grouped_top_k",
    "route",
    "route_noaux_tc",
    "route_softmax_topk",
    "select_experts",
    "sort_rows_by_expert",
    "W8A8Linear",
    "GatedMLP",
    "W4A8MoE",
    "PackedExperts",
    "SharedExpert",
]
