"""The runtime MoE layer: routing, packed W4A8 experts, shared expert (gated MLP), W8A8 linears."""

from w4a8moe.moe.routing import RoutingConfig, route, route_noaux_tc, route_softmax_topk, select_experts
from w4a8moe.moe.linear import W8A8Linear
from w4a8moe.moe.layer import GatedMLP, W4A8MoE, PackedExperts, SharedExpert

__all__ = [
    "RoutingConfig",
    "route",
    "route_noaux_tc",
    "route_softmax_topk",
    "select_experts",
    "W8A8Linear",
    "GatedMLP",
    "W4A8MoE",
    "PackedExperts",
    "SharedExpert",
]
