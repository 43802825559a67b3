"""Exact int8 x int8 -> int32 products through ``torch._int_mm``, zero-padded to its rules.

cuBLASLt's int8 GEMM behind ``torch._int_mm`` on CUDA wants more than 16 rows and K and N
multiples of 8. Zero rows and columns add nothing to any product, so padding keeps it exact;
:func:`int_mm_padded` is that one rule, used by the Triton backend's W8A8 Linears and
``int_matmul`` and by :class:`CudaIntMatmul`. (``torch._int_mm`` also runs on the CPU, where the
padding is not needed but is harmless: that is how CI tests this file without a GPU.)

:class:`CudaIntMatmul` is the clip search's CUDA products where the Triton backend is not
installed (:func:`w4a8moe.kernels.base.int_matmul_backend` prefers Triton when registered).
"""

from __future__ import annotations

import torch

MIN_ROWS = 17
MULTIPLE = 8


def _round_up(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def pad_weight_for_int_mm(weight_q: torch.Tensor) -> torch.Tensor | None:
    """``weight_q`` int8 ``[N, K]`` zero-padded to multiples of 8 on both sides, or ``None``
    where it needs no padding: computed once at load for a weight multiplied many times."""
    n, k = weight_q.shape
    if n % MULTIPLE == 0 and k % MULTIPLE == 0:
        return None
    return torch.nn.functional.pad(weight_q, (0, _round_up(k, MULTIPLE) - k, 0, _round_up(n, MULTIPLE) - n))


def int_mm_padded(a_q: torch.Tensor, b_q: torch.Tensor, b_padded: torch.Tensor | None = None) -> torch.Tensor:
    """Exact int32 ``a_q [M, K] @ b_q [N, K]^T`` by ``torch._int_mm`` with zero padding.

    ``b_padded`` is :func:`pad_weight_for_int_mm` of ``b_q`` where the caller keeps one. The
    caller checks dtypes, shapes and that ``K * 128 * 128`` fits in int32.
    """
    m, k = a_q.shape
    n = b_q.shape[0]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros((m, n), dtype=torch.int32, device=a_q.device)
    kp, np_ = _round_up(k, MULTIPLE), _round_up(n, MULTIPLE)
    b = b_padded if b_padded is not None else b_q
    if b.shape != (np_, kp):
        b = torch.nn.functional.pad(b_q, (0, kp - k, 0, np_ - n))
    a = a_q
    if m < MIN_ROWS or kp != k:
        a = torch.nn.functional.pad(a_q, (0, kp - k, 0, max(MIN_ROWS - m, 0)))
    out = torch._int_mm(a.contiguous(), b.t())
    return out[:m, :n].contiguous() if out.shape != (m, n) else out


class CudaIntMatmul:
    """``int_matmul`` on one CUDA device (see the module docstring)."""

    name = "cuda-int-mm"

    def __init__(self, device: torch.device):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device} requested, but torch sees no CUDA device")
        self.device = device

    def int_matmul(self, a_q: torch.Tensor, b_q: torch.Tensor) -> torch.Tensor:
        """Exact int32 ``a_q [M, K] @ b_q[N, K]^T`` on this device."""
        if a_q.dtype != torch.int8 or b_q.dtype != torch.int8 or a_q.dim() != 2 or b_q.dim() != 2 \
                or a_q.shape[1] != b_q.shape[1]:
            raise ValueError(f"expected int8 [M, K] and [N, K], got {a_q.dtype} {list(a_q.shape)} and "
                             f"{b_q.dtype} {list(b_q.shape)}")
        if a_q.shape[1] * 128 * 128 >= 2**31:
            raise OverflowError(f"K={a_q.shape[1]} could overflow the int32 accumulator")
        return int_mm_padded(a_q.to(self.device), b_q.to(self.device))
