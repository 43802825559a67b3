"""Per-token dynamic int8 activations and the SwiGLU-clip-quant step (SPEC 1, 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

INT8_MAX = 127


def _quant_rows(x: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize fp32 rows against a per-row bound ``amax`` ``[M, 1]``."""
    scale = amax / INT8_MAX
    # Rows that are all zero keep scale 0 (their output is exactly 0); divide by 1 there.
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    # In place on the one new [M, K] temporary: large temporaries cost page faults every call.
    q = torch.div(x, safe)
    return q.round_().clamp_(-128, 127).to(torch.int8), scale


def dynamic_quant_per_token(x: torch.Tensor, row_max: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``a_m = max_k |x[m,k]| / 127``, ``x_q = round(x / a_m)``.

    Computed in fp32 whatever the input dtype. Returns ``(x_q int8 [M, K], a fp32 [M, 1])``.
    ``row_max`` fp32 ``[M, 1]`` replaces ``max_k |x[m, k]|`` when ``x`` holds only some of a
    row's columns (a tensor-parallel rank's share, SPEC 7b): the max over the whole row.
    """
    xf = x.to(torch.float32)
    if xf.shape[0] == 0:
        return xf.to(torch.int8), xf.new_zeros((0, 1))
    amax = xf.abs().amax(dim=-1, keepdim=True) if row_max is None else row_max.to(torch.float32).reshape(-1, 1)
    return _quant_rows(xf, amax)


def silu_mul_fp32(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` computed in fp32 from ``g``, ``u`` of any float dtype (SPEC 1, 2)."""
    return F.silu(gate.to(torch.float32)) * up.to(torch.float32)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The activation of a gated MLP (shared expert, dense layer), SPEC 1: :func:`silu_mul_fp32`
    rounded once to ``out_dtype`` (default: ``gate``'s dtype), as the engines' fused SiluAndMul.

    A plain bf16 ``silu(g) * u`` rounds twice (after ``silu`` and after the product)."""
    return silu_mul_fp32(gate, up).to(out_dtype or gate.dtype)


def swiglu_fp32(gate_up: torch.Tensor) -> torch.Tensor:
    """:func:`silu_mul_fp32` of the first half of the columns (``g``) and the second (``u``)."""
    gu = gate_up.to(torch.float32)
    inter = gu.shape[-1] // 2
    return silu_mul_fp32(gu[..., :inter], gu[..., inter:])


def swiglu_clip_quant(
    gate_up: torch.Tensor, alpha: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation clip of SPEC section 2, from the GMM1 output to the GMM2 input.

    ``h = silu(g) * u`` in fp32; ``A_m = alpha_m * max_j |h[m, j]|``; ``h~ = clamp(h, -A, A)``;
    ``c_m = A_m / 127``; ``h_q = round_half_even(h~ / c_m)`` saturated to int8.
    ``alpha`` is a scalar or one value per row ``[M]`` / ``[M, 1]`` (each row's expert).
    ``alpha = 1`` is exactly plain SwiGLU followed by :func:`dynamic_quant_per_token`.
    """
    h = swiglu_fp32(gate_up)
    if h.shape[0] == 0:
        return h.to(torch.int8), h.new_zeros((0, 1))
    return clip_quant_rows(h, alpha, h.abs().amax(dim=-1, keepdim=True))


def clip_quant_rows(h: torch.Tensor, alpha: torch.Tensor | float, row_max: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The clip and quantization of :func:`swiglu_clip_quant` for fp32 ``h`` ``[M, J]`` given
    ``row_max`` fp32 ``[M, 1]`` = ``max_j |h[m, j]|`` over the whole row.

    A tensor-parallel rank holds ``J = I / tp`` columns of ``h``; with the max over all ``I``
    (agreed between ranks, SPEC 7b) it gets exactly the unsplit ``h_q`` columns and ``c_m``.
    """
    if h.shape[0] == 0:
        return h.to(torch.int8), h.new_zeros((0, 1))
    alpha_t = torch.as_tensor(alpha, dtype=torch.float32, device=h.device)
    if alpha_t.dim() == 1:
        alpha_t = alpha_t.unsqueeze(-1)
    bound = alpha_t * row_max.to(torch.float32).reshape(-1, 1)
    h_clipped = torch.minimum(torch.maximum(h, -bound), bound)
    return _quant_rows(h_clipped, bound)
