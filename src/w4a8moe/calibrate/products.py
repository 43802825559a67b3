"""The clip search's exact integer products, run by a kernel backend.

Every product of the search is int8 x int4 (or int8) with exact int32 accumulation, so any
backend gives the same integers: the reference backend's float64 matmul (the slow baseline),
the native CPU kernel's int8 GEMM, or ``torch._int_mm`` / Triton on CUDA
(:func:`w4a8moe.kernels.base.int_matmul_backend`). The scaling and every float step after it
stay the torch functions of :mod:`w4a8moe.quant`, so the learned clips are bit-identical
whichever backend multiplies.

A backend may offer ``quantize_int4_operands(weight, scales, reuse)`` and
``operand_int_matmul(a_q, operand)`` (the CPU backend does): the per-channel int4 quantization
of an fp32 weight, written straight into its GEMM's operand in one pass (over ``reuse``, an
operand no longer needed, where given). The search quantizes each weight under
about twenty clip grids, and that pass is then as cheap as reading the weight once. It may
also offer ``scaled_squared_error`` (the CPU backend does): the scaling of the products and
their squared difference to a float64 reference, the same bits as those torch steps, in one
pass; the sums over them stay torch's. The search's float steps use two more, where offered,
through ``products.backend`` (see :mod:`w4a8moe.calibrate.clips`): ``row_absmax`` (the
channel maxima) and ``ste_clip_quant`` / ``ste_clip_quant_terms`` (the alpha refinement's
straight-through pass and its gradient terms), each with the torch path's bits (``row_absmax``
up to the sign of a zero maximum, which changes no scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from w4a8moe.quant import INT4_MAX, quantize_with_scale, scale_int32


@dataclass
class Int4Operand:
    """One quantized weight as the backend multiplies it: ``values`` (int8 ``[N, K]`` or the
    backend's own prepared form) and its fp32 scales ``[N]``."""

    values: object
    scale: torch.Tensor


class IntProducts:
    """Exact int8 products for the clip search through one backend (see the module docstring)."""

    def __init__(self, backend: object | None = None, device: torch.device | str | None = None):
        from w4a8moe.kernels.base import int_matmul_backend

        self.device = torch.device(device or "cpu")
        self.backend = backend if backend is not None else int_matmul_backend(self.device)
        cpu = self.device.type == "cpu"
        self._fused = cpu and callable(getattr(self.backend, "quantize_int4_operands", None))
        self._fused_errors = cpu and callable(getattr(self.backend, "scaled_squared_error", None))

    @property
    def name(self) -> str:
        """The backend's name (for reports)."""
        return str(getattr(self.backend, "name", type(self.backend).__name__))

    def weight_operand(self, weight: torch.Tensor, scale: torch.Tensor, reuse: Int4Operand | None = None
                       ) -> Int4Operand:
        """The int4 values of fp32 ``weight`` ``[N, K]`` under ``scale`` ``[N]`` (those of
        :func:`w4a8moe.quant.quantize_with_scale`), ready to multiply; ``reuse``: an operand no
        longer needed whose memory the backend may write over."""
        return self.weight_operands(weight, [scale], [reuse])[0]

    def weight_operands(self, weight: torch.Tensor, scales: list[torch.Tensor],
                        reuse: list[Int4Operand | None] | None = None) -> list[Int4Operand]:
        """:meth:`weight_operand` under each of ``scales``, in one pass over the weight where the
        backend offers it."""
        if not self._fused:
            return [Int4Operand(quantize_with_scale(weight, s, INT4_MAX), s) for s in scales]
        spares = [r.values if r is not None and not isinstance(r.values, torch.Tensor) else None
                  for r in (reuse or [])]
        made = self.backend.quantize_int4_operands(weight, scales, spares)
        return [Int4Operand(values, s) for values, s in zip(made, scales)]

    def values_operand(self, q: torch.Tensor, scale: torch.Tensor) -> Int4Operand:
        """Given int8 values ``q`` ``[N, K]`` (GPTQ's) and their scales."""
        return Int4Operand(q, scale)

    def int32(self, a_q: torch.Tensor, operand: Int4Operand) -> torch.Tensor:
        """Exact int32 ``a_q @ q^T`` ``[M, N]``."""
        if isinstance(operand.values, torch.Tensor):
            return self.backend.int_matmul(a_q, operand.values)
        return self.backend.operand_int_matmul(a_q, operand.values)

    def scaled(self, a_q: torch.Tensor, a_scale: torch.Tensor, operand: Int4Operand,
               out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """Bit-identical to :func:`w4a8moe.quant.scaled_int_matmul` of ``a_q``, ``a_scale`` and
        the operand's values and scales."""
        return scale_int32(self.int32(a_q, operand), a_scale, operand.scale, out_dtype)

    def squared_errors(self, a_q: torch.Tensor, a_scale: torch.Tensor, operand: Int4Operand,
                       reference: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """float64 ``[M, N]``: ``(scaled(a_q, a_scale, operand, out_dtype).double() - reference) ** 2``
        element for element (``reference`` float64 ``[M, N]``); callers sum it."""
        acc = self.int32(a_q, operand)
        if self._fused_errors:
            return self.backend.scaled_squared_error(acc, a_scale, operand.scale, reference, out_dtype)
        return scale_int32(acc, a_scale, operand.scale, out_dtype).to(torch.float64).sub_(reference).square_()
