"""Exact int8 x int8 -> int32 products on CUDA through ``torch._int_mm``.

The clip search's only need from a CUDA device until the Triton backend provides
``int_matmul`` itself (:func:`w4a8moe.kernels.base.int_matmul_backend` prefers it when
registered). ``torch._int_mm`` runs cuBLASLt's int8 GEMM with int32 accumulation, which is
exact for the sizes used here (``K * 128 * 128 < 2**31``). Its shape rules (more than 16
rows, K and N multiples of 8) are met by zero padding, which adds nothing to any product.
"""

from __future__ import annotations

import torch

_MIN_ROWS = 17
_MULTIPLE = 8


def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if t.shape == (rows, cols):
        return t.contiguous()
    out = torch.zeros((rows, cols), dtype=t.dtype, device=t.device)
    out[: t.shape[0], : t.shape[1]] = t
    return out


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
        m, k = a_q.shape
        n = b_q.shape[0]
        if k * 128 * 128 >= 2**31:
            raise OverflowError(f"K={k} could overflow the int32 accumulator")
        if m == 0 or n == 0 or k == 0:
            return torch.zeros((m, n), dtype=torch.int32, device=a_q.device)
        kp = -(-k // _MULTIPLE) * _MULTIPLE
        a = _pad_to(a_q.to(self.device), max(m, _MIN_ROWS), kp)
        b = _pad_to(b_q.to(self.device), -(-n // _MULTIPLE) * _MULTIPLE, kp)
        return torch._int_mm(a, b.T)[:m, :n]
