"""The expert path and the W8A8 Linear with their reduction dimension split over ranks (SPEC 7b).

Tensor parallelism gives each rank a share of a matmul's K: ``I / tp`` columns of every
expert's ``h`` (and of its GMM2 weight), or ``K / tp`` input columns of a row-parallel Linear.
The per-token int8 scale and the clip bound are maxima over the *whole* row, so a rank that
used its local maximum would compute different bits than one rank does. Here the ranks
agree first: each computes its local row maxima, ``all_reduce_max`` (one float per row)
gives the global ones, each quantizes its columns against them, computes the exact int32
partial accumulation of its share, ``all_reduce_sum`` adds the integers (exact), and the
scales are applied once to the sum: the bits of the unsplit computation, on every rank.

The reducers are plain callables (in-place on their argument), so the same code runs with a
process group's collectives in an engine and with simulated ranks in the tests.

One caveat of torch itself: ``silu`` takes its scalar code for the elements past a row's
last whole vector block, and those differ from the vector code by 1 ulp for a handful of
bf16 inputs. A rank's ``h`` has ``I / tp`` columns, so the split is bit-exact when ``I / tp``
is a multiple of torch's vector block (16-64 fp32 lanes; true for every real model: I =
2048, 1536, 768, ...).
"""

from __future__ import annotations

from typing import Callable

import torch

from w4a8moe.kernels.base import ExpertBackend
from w4a8moe.quant import clip_quant_rows, dynamic_quant_per_token, swiglu_fp32

Reducer = Callable[[torch.Tensor], torch.Tensor]
"""Reduces a tensor across ranks (max or sum) and returns the result (may work in place)."""


def _local_row_max(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] == 0 or x.shape[1] == 0:
        return torch.zeros((x.shape[0], 1), dtype=torch.float32)
    return x.abs().amax(dim=-1, keepdim=True).to(torch.float32)


def split_expert_rows(
    backend: ExpertBackend,
    prepared: object,
    w2_scale: torch.Tensor,
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    token_ids: torch.Tensor,
    expert_offsets: torch.Tensor,
    alpha: torch.Tensor,
    all_reduce_max: Reducer,
    all_reduce_sum: Reducer,
) -> torch.Tensor:
    """This rank's share of :meth:`ExpertBackend.grouped_forward` with the ranks agreeing on the
    clip: returns bf16 ``[R, H]``, the same bits as the unsplit ``grouped_forward`` on every rank.

    ``prepared`` holds this rank's columns of every expert (``w13``: its ``I / tp`` gate and
    its ``I / tp`` up channels; ``w2``: its ``I / tp`` input columns); ``w2_scale`` fp32
    ``[E, H]`` (never split). Every rank calls this with the same routed rows.
    """
    gate_up = backend.gate_up_rows(prepared, x_q, x_scale, token_ids, expert_offsets)
    h = swiglu_fp32(gate_up)  # [R, I / tp], exact per column
    row_max = all_reduce_max(_local_row_max(h))
    counts = (expert_offsets[1:] - expert_offsets[:-1]).to(torch.int64)
    row_expert = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    h_q, h_scale = clip_quant_rows(h, alpha.to(torch.float32)[row_expert], row_max)
    acc = all_reduce_sum(backend.down_rows_int32(prepared, h_q, expert_offsets))
    # scaled_int_matmul's operation order: (acc * c_m) * s_n, rounded once to bf16.
    y = acc.to(torch.float32) * h_scale.reshape(-1, 1) * w2_scale.to(torch.float32)[row_expert]
    return y.to(torch.bfloat16)


def split_int8_linear(
    backend: ExpertBackend,
    prepared: object,
    weight_scale: torch.Tensor,
    x: torch.Tensor,
    all_reduce_max: Reducer,
    all_reduce_sum: Reducer,
) -> torch.Tensor:
    """A row-parallel W8A8 Linear: ``x`` ``[M, K / tp]`` is this rank's share of the input and
    ``prepared`` its ``[N, K / tp]`` weight; returns bf16 ``[M, N]``, the bits of the unsplit
    :func:`w4a8moe.quant.w8a8_linear` on every rank (``weight_scale`` fp32 ``[N]``)."""
    x2 = x.reshape(-1, x.shape[-1])
    row_max = all_reduce_max(_local_row_max(x2))
    x_q, x_scale = dynamic_quant_per_token(x2, row_max=row_max)
    acc = all_reduce_sum(backend.int8_linear_int32(prepared, x_q))
    y = acc.to(torch.float32) * x_scale.reshape(-1, 1) * weight_scale.to(torch.float32).reshape(1, -1)
    return y.to(torch.bfloat16).reshape(*x.shape[:-1], weight_scale.numel())
