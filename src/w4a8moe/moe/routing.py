"""Expert selection: DeepSeek ``noaux_tc`` and softmax top-k (SPEC 3), and the sort of the
routed rows by expert.

The functions take an optional kernel ``backend``: one that offers ``select_experts`` and
``sort_rows`` (the native CPU kernel does) runs the selection and the sort in one call each,
the same bits as the torch code here, which is the definition and runs everywhere else. At
decode a MoE block routes one token, where the twenty-odd small torch ops of the selection
and the sort cost more than the router's matmul (and, between a decoder layer's other work,
each runs on cold caches).

Equal values rank by the lower expert (or group) index, NaN above every number: a stable
sort, where ``torch.topk`` leaves ties in an order of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from w4a8moe.formats.model_config import RoutingConfig


def _top_k(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of the ``k`` largest along the last dim, best first; ties by index."""
    ranked, order = torch.sort(values, dim=-1, descending=True, stable=True)
    return ranked[..., :k], order[..., :k]


def _native(backend: object | None, capability: str, t: torch.Tensor) -> object | None:
    """``backend``'s ``capability`` method where it has one and ``t`` is a CPU tensor."""
    method = getattr(backend, capability, None) if backend is not None else None
    return method if (callable(method) and t.device.type == "cpu") else None


def grouped_top_k(scores: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int = 1,
                  topk_group: int = 1, backend: object | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The choice of SPEC 3 on fp32 ``scores`` ``[M, E]``: rank ``s' = s + bias`` (``s`` without
    a bias); with ``n_group > 1`` keep the ``topk_group`` groups whose two largest ``s'`` sum
    highest; pick the ``top_k`` experts by ``s'`` among them. Returns ``(s of those experts fp32
    [M, k], ids int64 [M, k])``, best first."""
    select = _native(backend, "select_experts", scores)
    if select is not None and n_group <= 64:
        return select(scores, bias, top_k, n_group, topk_group)
    m, e = scores.shape
    biased = scores if bias is None else scores + bias.to(torch.float32).unsqueeze(0)
    if n_group > 1:
        per_group = e // n_group
        grouped = biased.view(m, n_group, per_group)
        best_two = _top_k(grouped, min(2, per_group))[0]
        group_score = best_two[..., 0] + best_two[..., 1] if per_group > 1 else best_two[..., 0]
        kept = _top_k(group_score, topk_group)[1]
        group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, True)
        biased = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(m, e)
    ids = _top_k(biased, top_k)[1]
    return scores.gather(1, ids), ids


def route_noaux_tc(
    logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool = True,
    backend: object | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing. Returns fp32 weights ``[M, k]`` and int64 ids ``[M, k]``.

    ``s = sigmoid(logits)``; ``s' = s + bias``; a group's score is the sum of its two largest
    ``s'``; the best ``topk_group`` groups are kept; the top-k experts by ``s'`` among them are
    chosen; their weights are the unbiased ``s``, renormalised when ``norm_topk_prob``.
    """
    scores = torch.sigmoid(logits.to(torch.float32))
    weights, ids = grouped_top_k(scores, correction_bias, top_k, n_group, topk_group, backend)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights, ids


def route_softmax_topk(
    logits: torch.Tensor, top_k: int, norm_topk_prob: bool = True, backend: object | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, top-k, optionally renormalised (Qwen-MoE, Mixtral, OLMoE)."""
    probs = torch.softmax(logits.to(torch.float32), dim=-1)
    weights, ids = grouped_top_k(probs, None, top_k, backend=backend)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def select_experts(
    logits: torch.Tensor, config: RoutingConfig, correction_bias: torch.Tensor | None = None,
    backend: object | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to the routing method of ``config``; weights do not include the scaling factor."""
    if config.method == "noaux_tc":
        if correction_bias is None:
            raise ValueError("noaux_tc routing needs e_score_correction_bias")
        return route_noaux_tc(logits, correction_bias, config.top_k, config.n_group, config.topk_group,
                              config.norm_topk_prob, backend)
    return route_softmax_topk(logits, config.top_k, config.norm_topk_prob, backend)


def route(
    x: torch.Tensor, router_weight: torch.Tensor, config: RoutingConfig, correction_bias: torch.Tensor | None = None,
    backend: object | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits of ``x`` ``[M, H]`` in fp32 (SPEC 3; ``router_weight`` ``[E, H]``, best held
    in fp32 already), then :func:`select_experts`: ``(weights fp32 [M, k], ids int64 [M, k])``."""
    logits = F.linear(x.to(torch.float32), router_weight.to(torch.float32))
    return select_experts(logits, config, correction_bias, backend)


@dataclass
class ExpertRows:
    """The ``M * k`` routed rows of a batch (row ``i`` is token ``i // k``, slot ``i % k``) in
    expert order, stable: ``order`` int64 (the row at each position), ``token_ids`` int64 (its
    token), ``offsets`` int64 ``[E + 1]`` (where each expert's rows start) and, when weights
    were given, ``row_weights`` fp32 (each row's routing weight)."""

    order: torch.Tensor
    token_ids: torch.Tensor
    offsets: torch.Tensor
    row_weights: torch.Tensor | None = None


def sort_rows_by_expert(ids: torch.Tensor, num_experts: int, weights: torch.Tensor | None = None,
                        backend: object | None = None) -> ExpertRows:
    """Sort the routed rows of ``ids`` ``[M, k]`` (values in ``[0, num_experts)``) by expert,
    stably, as the expert kernels take them (see :class:`ExpertRows`); ``weights`` ``[M, k]``
    come along as ``row_weights``. No host synchronisation on a GPU."""
    sort = _native(backend, "sort_rows", ids)
    if sort is not None:
        return ExpertRows(*sort(ids, num_experts, weights))
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offsets = torch.searchsorted(flat[order].contiguous(), torch.arange(num_experts + 1, device=ids.device))
    row_weights = None if weights is None else weights.reshape(-1)[order]
    return ExpertRows(order, torch.div(order, max(k, 1), rounding_mode="floor"), offsets, row_weights)
