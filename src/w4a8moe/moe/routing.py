"""Expert selection: DeepSeek ``noaux_tc`` and softmax top-k (SPEC section 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from w4a8moe.formats.model_config import RoutingConfig


def route_noaux_tc(
    logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing. Returns fp32 weights ``[M, k]`` and int64 ids ``[M, k]``.

    ``s = sigmoid(logits)``; ``s' = s + bias``; a group's score is the sum of its two largest
    ``s'``; the best ``topk_group`` groups are kept; the top-k experts by ``s'`` among them are
    chosen; their weights are the unbiased ``s``, renormalised when ``norm_topk_prob``.
    """
    m, e = logits.shape
    scores = torch.sigmoid(logits.to(torch.float32))
    biased = scores + correction_bias.to(torch.float32).unsqueeze(0)
    per_group = e // n_group
    grouped = biased.view(m, n_group, per_group)
    top_two = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)  # [M, n_group]
    kept_groups = top_two.topk(topk_group, dim=-1).indices
    group_mask = torch.zeros_like(top_two, dtype=torch.bool).scatter_(1, kept_groups, True)
    expert_mask = group_mask.unsqueeze(-1).expand(m, n_group, per_group).reshape(m, e)
    masked = biased.masked_fill(~expert_mask, float("-inf"))
    ids = masked.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights, ids


def route_softmax_topk(
    logits: torch.Tensor, top_k: int, norm_topk_prob: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, top-k, optionally renormalised (Qwen-MoE, Mixtral, OLMoE)."""
    probs = torch.softmax(logits.to(torch.float32), dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def select_experts(
    logits: torch.Tensor, config: RoutingConfig, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to the routing method of ``config``; weights do not include the scaling factor."""
    if config.method == "noaux_tc":
        if correction_bias is None:
            raise ValueError("noaux_tc routing needs e_score_correction_bias")
        return route_noaux_tc(
            logits, correction_bias, config.top_k, config.n_group, config.topk_group, config.norm_topk_prob
        )
    return route_softmax_topk(logits, config.top_k, config.norm_topk_prob)


def route(
    x: torch.Tensor, router_weight: torch.Tensor, config: RoutingConfig, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits of ``x`` ``[M, H]`` in fp32 (SPEC 3; ``router_weight`` ``[E, H]``, best held
    in fp32 already), then :func:`select_experts`: ``(weights fp32 [M, k], ids int64 [M, k])``."""
    logits = F.linear(x.to(torch.float32), router_weight.to(torch.float32))
    return select_experts(logits, config, correction_bias)
