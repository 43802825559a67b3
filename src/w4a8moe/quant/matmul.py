"""Integer matmuls with exact int32 accumulation and their scaling (SPEC section 1)."""

from __future__ import annotations

import torch

from w4a8moe.quant.activations import dynamic_quant_per_token


def int8_matmul_int32(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """``x_q [M, K] @ w_q[N, K]^T`` with exact integer accumulation, returned as int32.

    The products are summed in float64, which is exact for integers below 2**53 (far above
    any int8 x int8 sum of a real layer) and runs on BLAS; the result is checked to fit the
    int32 range a real kernel accumulates in.
    """
    acc = x_q.to(torch.float64) @ w_q.to(torch.float64).T
    if acc.numel() and float(acc.abs().max()) >= 2**31:
        raise OverflowError("int32 accumulator overflow")
    return acc.to(torch.int32)


def scaled_int_matmul(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``y[m, n] = a_m * s_n * sum_k x_q[m, k] * w_q[n, k]``; the product is formed in fp32."""
    return scale_int32(int8_matmul_int32(x_q, w_q), x_scale, w_scale, out_dtype)


def scale_int32(
    acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """The scaling of :func:`scaled_int_matmul`: ``(float(acc) * a_m) * s_n`` in fp32, then
    ``out_dtype``, for an exact int32 accumulation ``acc`` ``[M, N]`` computed elsewhere (a
    kernel backend's ``int_matmul``)."""
    # In place on the one new [M, N] temporary (the same fp32 products, fewer page faults).
    y = acc.to(torch.float32, copy=True)
    y.mul_(x_scale.reshape(-1, 1).to(torch.float32)).mul_(w_scale.reshape(1, -1).to(torch.float32))
    return y.to(out_dtype)


def w8a8_linear(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """W8A8 dynamic Linear: per-token int8 activations times int8 per-channel weights."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    x_q, a = dynamic_quant_per_token(x2)
    return scaled_int_matmul(x_q, a, w_q, w_scale, out_dtype).reshape(*lead, w_q.shape[0])
