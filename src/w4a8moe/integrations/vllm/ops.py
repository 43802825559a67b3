"""The plugin's torch custom ops: routing plus the expert computation, and the W8A8 Linear,
opaque to Dynamo.

vLLM's default (compiled) mode traces the model with Dynamo; the project's backends are
Python plus ctypes, which Dynamo cannot trace. Each op therefore takes the activations and
the *name* of its layer (a constant in the graph) and looks the layer's prepared state up in
this process's registry, filled by the layer methods after loading.

The MoE op routes itself (the project's :func:`w4a8moe.moe.route`: fp32 logits, SPEC 3) from
router tensors the plugin reads from the checkpoint, and never reads vLLM's router logits:
in vLLM 0.32's compiled CPU graphs those come from ``_C::onednn_mm``, which writes its output
in place without Inductor seeing the write, so Inductor may schedule the routing math before
the GEMM has run (seen on DeepSeek-V3: routing on uninitialised memory, weights like 0.25 or
1/3 each).

Parallel ranks (SPEC 7b) exchange what exactness needs inside the ops: under tensor
parallelism each row's max and the int32 partial accumulations
(:mod:`w4a8moe.kernels.split`); under expert parallelism the bf16 rows of each rank's
experts, so that every rank sums each token's rows in the single-rank order. vLLM then
all-reduces the layer output across the group; the ops hand it the whole result on rank 0
and zeros elsewhere, and ``x + 0 = x`` keeps the bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from w4a8moe.formats.model_config import RoutingConfig
from w4a8moe.kernels import ExpertBackend, combine_rows
from w4a8moe.kernels.split import split_expert_rows, split_int8_linear
from w4a8moe.moe.routing import route, sort_rows_by_expert


@dataclass
class ParallelGroup:
    """The ranks one layer is split over (``world == 1``: none)."""

    rank: int = 0
    world: int = 1
    group: object = None  # a torch.distributed process group (gloo, CPU tensors)

    def all_reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """All-reduce ``t`` in place (``op`` is ``"sum"`` or ``"max"``) and return it."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.group)
        return t

    def share_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's bf16 rows where each position is written by exactly one rank (zeros
        elsewhere): summed as integers, so each value arrives bit for bit."""
        wide = rows.view(torch.int16).to(torch.int32)
        return self.all_reduce(wide, "sum").to(torch.int16).view(torch.bfloat16)

    def only_rank0(self, t: torch.Tensor) -> torch.Tensor:
        """The whole result on rank 0, zeros elsewhere, for vLLM's sum over the group."""
        return t if self.rank == 0 else torch.zeros_like(t)


@dataclass
class MoEState:
    """One MoE layer's router and prepared experts on this rank."""

    router_weight: torch.Tensor  # fp32 [E_global, H]
    correction_bias: torch.Tensor | None  # fp32 [E_global] (noaux_tc routing)
    routing: RoutingConfig
    weight_scale: float  # what vLLM's router would fold into the weights (1.0 where the runner scales)
    backend: ExpertBackend
    prepared: object
    w2_scale: torch.Tensor  # fp32 [E_local, H]
    alpha: torch.Tensor  # fp32 [E_local]; ones when the clip is not applied
    num_global_experts: int
    expert_map: torch.Tensor | None  # int64 [E_global] -> local slot or -1 (expert parallel)
    tp: ParallelGroup  # I split over these ranks
    ep: ParallelGroup  # experts split over these ranks
    group: ParallelGroup  # the group vLLM reduces the layer output over


@dataclass
class LinearState:
    """One W8A8 Linear's prepared weight on this rank."""

    backend: ExpertBackend
    prepared: object
    weight_scale: torch.Tensor  # fp32 [N_local]
    out_features: int
    row_parallel: ParallelGroup  # K split over these ranks (world 1: not row-parallel)


MOE_LAYERS: dict[str, MoEState] = {}
DUMP_ENV = "W4A8MOE_VLLM_DUMP_DIR"
"""Testing: rank 0 saves the first calls' inputs and outputs of each MoE layer here."""
_DUMPED: dict[str, int] = {}
LINEAR_LAYERS: dict[str, LinearState] = {}


def moe_experts(x: torch.Tensor, layer: str) -> torch.Tensor:
    """``sum_k w_k * expert_k(x)`` for bf16 ``x`` ``[M, H]`` under the project's routing: bf16
    ``[M, H]``, this rank's share of the group sum (see the module docstring)."""
    st = MOE_LAYERS[layer]
    m, hidden = x.shape
    if m == 0:
        return torch.zeros((0, hidden), dtype=x.dtype)
    x = x.to(torch.bfloat16)
    weights, ids = route(x, st.router_weight, st.routing, st.correction_bias, st.backend)
    if st.weight_scale != 1.0:
        weights = weights * st.weight_scale
    x_q, x_scale = st.backend.quantize_per_token(x)
    rows = sort_rows_by_expert(ids, st.num_global_experts, weights, st.backend)
    token_ids, offsets, row_weights = rows.token_ids, rows.offsets, rows.row_weights
    if st.ep.world > 1:
        # This rank's experts on their rows, scattered to the rows' flat positions, then
        # every rank holds every row and sums each token in the single-rank order.
        local_ids = st.expert_map[ids]
        keep = (local_ids >= 0).reshape(-1)
        flat_pos = torch.nonzero(keep).reshape(-1)
        local = sort_rows_by_expert(local_ids.reshape(-1)[flat_pos].reshape(-1, 1), st.alpha.numel(),
                                    backend=st.backend)
        local_rows = st.backend.grouped_forward(st.prepared, x_q, x_scale,
                                                torch.div(flat_pos[local.order], ids.shape[1], rounding_mode="floor"),
                                                local.offsets, st.alpha)
        rows_bf16 = torch.zeros((ids.numel(), hidden), dtype=torch.bfloat16)
        rows_bf16[flat_pos[local.order]] = local_rows
        rows_bf16 = st.ep.share_rows(rows_bf16)[rows.order]
        out = combine_rows(rows_bf16, token_ids, row_weights, m)
    elif st.tp.world > 1:
        rows = split_expert_rows(st.backend, st.prepared, st.w2_scale, x_q, x_scale, token_ids, offsets, st.alpha,
                                 lambda t: st.tp.all_reduce(t, "max"), lambda t: st.tp.all_reduce(t, "sum"))
        out = combine_rows(rows, token_ids, row_weights, m)
    else:
        out = st.backend.combined_forward(st.prepared, x_q, x_scale, token_ids, offsets, st.alpha, row_weights)
    result = out.to(torch.bfloat16)
    _maybe_dump(layer, st, x, weights, ids, result)
    return st.group.only_rank0(result)


def _maybe_dump(layer: str, st: MoEState, x, weights, ids, out) -> None:
    import os

    directory = os.environ.get(DUMP_ENV)
    count = _DUMPED.get(layer, 0)
    if not directory or st.group.rank != 0 or count >= 4:
        return
    _DUMPED[layer] = count + 1
    torch.save({"layer": layer, "x": x.clone(), "weights": weights.clone(), "ids": ids.clone(), "out": out.clone()},
               os.path.join(directory, f"{layer}.{count}.pt"))


def int8_linear(x: torch.Tensor, layer: str) -> torch.Tensor:
    """A W8A8 Linear of bf16 ``x`` ``[..., K_local]``: bf16 ``[..., N_local]``."""
    st = LINEAR_LAYERS[layer]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    group = st.row_parallel
    if group.world > 1:
        y = split_int8_linear(st.backend, st.prepared, st.weight_scale, x2,
                              lambda t: group.all_reduce(t, "max"), lambda t: group.all_reduce(t, "sum"))
        y = group.only_rank0(y)
    else:
        x_q, x_scale = st.backend.quantize_per_token(x2)
        y = st.backend.int8_linear(st.prepared, x_q, x_scale)
    return y.reshape(*lead, st.out_features)


@torch.library.custom_op("w4a8moe::moe_experts", mutates_args=())
def _moe_experts_op(x: torch.Tensor, layer: str) -> torch.Tensor:
    return moe_experts(x, layer)


@_moe_experts_op.register_fake
def _(x: torch.Tensor, layer: str) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.bfloat16)


@torch.library.custom_op("w4a8moe::int8_linear", mutates_args=())
def _int8_linear_op(x: torch.Tensor, layer: str, out_features: int) -> torch.Tensor:
    return int8_linear(x, layer)


@_int8_linear_op.register_fake
def _(x: torch.Tensor, layer: str, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features), dtype=torch.bfloat16)
