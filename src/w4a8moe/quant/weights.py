"""Per-output-channel symmetric weight quantization and the kernel bias (SPEC 1, 4)."""

from __future__ import annotations

import torch

from w4a8moe.quant.int4 import INT4_MAX, unpack_int4_pairs

INT8_WEIGHT_MAX = 127
KERNEL_BIAS_CHUNKS = 16
"""The AscendV1 down-projection ``scale_bias`` holds this many partial sums over K."""


def _per_channel_symmetric(
    weight: torch.Tensor, qmax: int, clip: torch.Tensor | float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if weight.dim() < 2:
        raise ValueError(f"expected a weight [..., N, K], got shape {tuple(weight.shape)}")
    w = weight.to(torch.float32)
    scale = per_channel_scale(checked_channel_amax(w), qmax, clip)
    return quantize_with_scale(w, scale, qmax), scale


def checked_channel_amax(w: torch.Tensor) -> torch.Tensor:
    """Each output channel's ``max |W|`` of fp32 ``w`` ``[..., N, K]`` (``[..., N]``); raises
    ``ValueError`` if ``w`` holds NaN or Inf.

    One pass, no ``[..., N, K]`` temporary: ``max |W| = max(-min W, max W)``, NaN and Inf
    propagating into it, so checking the N maxima checks the weight. (An all-zero channel may
    give -0, which :func:`per_channel_scale` maps to scale 1 like +0.)"""
    low, high = torch.aminmax(w, dim=-1)
    amax = torch.maximum(-low, high)
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("weight contains NaN or Inf")
    return amax


def per_channel_scale(amax: torch.Tensor, qmax: int, clip: torch.Tensor | float | None = None) -> torch.Tensor:
    """``s_n = clip_n * amax_n / qmax`` in fp32 (``amax`` ``[..., N]`` the channels' max ``|W|``).

    The scale half of the per-channel quantizers, for callers that quantize one weight under
    many clips (the clip search) and compute ``amax`` once.
    """
    if clip is not None:
        clip_t = torch.as_tensor(clip, dtype=torch.float32, device=amax.device)
        if bool(((clip_t <= 0) | (clip_t > 1)).any()):
            raise ValueError("weight clip factors must lie in (0, 1]")
        amax = amax * clip_t
    scale = amax / qmax
    # An all-zero channel gets scale 1 so that its scale stays positive and finite;
    # its quantized values are 0 either way.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _levels(w: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """``clamp(round_half_even(w / s_n), -qmax, qmax)`` in fp32, in one temporary."""
    return torch.div(w, scale.unsqueeze(-1)).round_().clamp_(-qmax, qmax)


def quantize_with_scale(w: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """``clamp(round_half_even(w / s_n), -qmax, qmax)`` as int8: the element half of the
    per-channel quantizers (``w`` fp32 ``[..., N, K]``, ``scale`` ``[..., N]``)."""
    return _levels(w, scale, qmax).to(torch.int8)


def fake_quantize_with_scale(w: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """``dequantize_per_channel(quantize_with_scale(w, scale, qmax), scale)``, the same bits,
    without the int8 tensor (the levels are exact in fp32; adding 0 turns the -0 rounding
    leaves into the int8 path's +0)."""
    return _levels(w, scale, qmax).add_(0.0).mul_(scale.unsqueeze(-1))


def quantize_int4_per_channel(
    weight: torch.Tensor, clip: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 per output channel with an optional weight clip ``alpha_w``.

    ``s_n = alpha_w,n * max_k |W[n,k]| / 7`` and ``q = clamp(round_half_even(W / s), -7, 7)``.
    Works on ``[N, K]`` or stacked ``[E, N, K]``; ``clip`` broadcasts against ``[..., N]``.
    Returns unpacked int8 values and fp32 scales ``[..., N]``.
    """
    return _per_channel_symmetric(weight, INT4_MAX, clip)


def quantize_int8_per_channel(
    weight: torch.Tensor, clip: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel (the W8A8 weights): ``s_n = max_k |W| / 127``."""
    return _per_channel_symmetric(weight, INT8_WEIGHT_MAX, clip)


def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * s`` in fp32: the float weight a quantized tensor stands for."""
    return q.to(torch.float32) * scale.to(torch.float32).reshape(*q.shape[:-1], 1)


def kernel_bias(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The Ascend A8W4 kernel constant ``8 * s_n * sum_k q[n, k]`` in fp32, shape ``[..., N]``.

    ``q`` holds unpacked int4 values ``[..., N, K]``.
    """
    qsum = q.to(torch.int64).sum(dim=-1).to(torch.float32)
    return 8.0 * scale.to(torch.float32).reshape(qsum.shape) * qsum


def kernel_bias_chunks(
    q: torch.Tensor, scale: torch.Tensor, chunks: int = KERNEL_BIAS_CHUNKS
) -> torch.Tensor:
    """The kernel bias as ``chunks`` partial sums over equal K-chunks: ``[..., N, chunks]``.

    Used by the AscendV1 down projection so that a tensor-parallel rank can take the sum
    over its own K-slice; the row sum equals :func:`kernel_bias`.
    """
    k = q.shape[-1]
    if k % chunks:
        raise ValueError(f"K={k} is not divisible into {chunks} equal chunks")
    parts = q.to(torch.int64).reshape(*q.shape[:-1], chunks, k // chunks).sum(dim=-1)
    return 8.0 * scale.to(torch.float32).reshape(*q.shape[:-1], 1) * parts.to(torch.float32)


_BIAS_BLOCK_BYTES = 1 << 20
"""About this many bytes of int64 values are unpacked at a time by :func:`kernel_bias_packed`."""


def kernel_bias_packed(packed: torch.Tensor, scale: torch.Tensor, chunks: int | None = None) -> torch.Tensor:
    """:func:`kernel_bias` (``chunks=None``, ``[N]``) or :func:`kernel_bias_chunks` (``[N, chunks]``)
    of packed int4 weights ``[N/2, K]``, unpacked a block of rows at a time.

    Unpacking a whole 7168 x 2048 projection makes 15 MB of int8 and 117 MB of int64
    temporaries; such mid-size blocks, freed among the small outputs a converter keeps,
    fragmented the heap by gigabytes over a layer of experts. Blocks of about 1 MB are reused
    from one to the next. Each output row is the same expression on the same integers as in
    the whole-tensor functions, so the bits are identical.
    """
    half, k = packed.shape
    n = 2 * half
    out = torch.empty((n, chunks) if chunks else (n,), dtype=torch.float32)
    scale = scale.reshape(n)
    rows = max(1, _BIAS_BLOCK_BYTES // (16 * max(k, 1)))  # packed rows per block (16 B of int64 per byte)
    for start in range(0, half, rows):
        end = min(half, start + rows)
        q = unpack_int4_pairs(packed[start:end])
        s = scale[2 * start : 2 * end]
        out[2 * start : 2 * end] = kernel_bias_chunks(q, s, chunks) if chunks else kernel_bias(q, s)
    return out
