"""Scale encodings used on disk (SPEC section 4)."""

from __future__ import annotations

import torch


def encode_scale_uint64(scale: torch.Tensor) -> torch.Tensor:
    """Encode fp32 scales as uint64 whose low 32 bits are the fp32 bit pattern."""
    if scale.dtype != torch.float32:
        raise TypeError(f"encode_scale_uint64 expects float32, got {scale.dtype}")
    bits = scale.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return bits.view(torch.uint64)


def decode_scale_uint64(encoded: torch.Tensor) -> torch.Tensor:
    """Decode uint64 scales (fp32 bits in the low half) back to fp32.

    Raises ``ValueError`` if any high 32 bits are set: such a tensor is not this encoding.
    """
    if encoded.dtype != torch.uint64:
        raise TypeError(f"decode_scale_uint64 expects uint64, got {encoded.dtype}")
    as_int = encoded.contiguous().view(torch.int64)
    if as_int.numel() and bool(((as_int >> 32) != 0).any()):
        raise ValueError("uint64 scale has non-zero high 32 bits; expected fp32 bits in the low half")
    low = (as_int & 0xFFFFFFFF).to(torch.int32)  # wraps into int32 two's complement
    return low.view(torch.float32)
