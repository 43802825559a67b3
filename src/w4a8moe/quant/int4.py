"""int4 storage: two output channels share one byte (SPEC section 4)."""

from __future__ import annotations

import torch

INT4_MAX = 7
"""Largest magnitude the quantizer produces; values are symmetric in [-7, 7]."""
INT4_MIN_KERNEL = -8
"""Smallest value a packed nibble can hold; kernels accept it, the quantizer never writes it."""


def pack_int4_pairs(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 values ``[..., N, K]`` into int8 ``[..., N/2, K]``.

    Byte ``[n2, k]`` holds channel ``2*n2`` in its low nibble and channel ``2*n2+1`` in its
    high nibble, both in two's complement. Leading dimensions (experts) are kept.
    """
    if q.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64):
        raise TypeError(f"pack_int4_pairs expects an integer tensor, got {q.dtype}")
    if q.dim() < 2:
        raise ValueError(f"pack_int4_pairs expects [..., N, K], got shape {tuple(q.shape)}")
    n = q.shape[-2]
    if n % 2:
        raise ValueError(f"pack_int4_pairs needs an even number of output channels, got N={n}")
    if q.numel() and (int(q.min()) < INT4_MIN_KERNEL or int(q.max()) > INT4_MAX):
        raise ValueError(
            f"pack_int4_pairs: values must lie in [{INT4_MIN_KERNEL}, {INT4_MAX}], "
            f"found [{int(q.min())}, {int(q.max())}]"
        )
    q = q.to(torch.int16)
    even = q[..., 0::2, :] & 0x0F
    odd = (q[..., 1::2, :] & 0x0F) << 4
    packed = (even | odd).to(torch.uint8)
    return packed.view(torch.int8)


def unpack_int4_pairs(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_pairs`: int8 ``[..., N/2, K]`` to int8 ``[..., N, K]``."""
    if packed.dtype != torch.int8:
        raise TypeError(f"unpack_int4_pairs expects int8, got {packed.dtype}")
    if packed.dim() < 2:
        raise ValueError(f"unpack_int4_pairs expects [..., N/2, K], got shape {tuple(packed.shape)}")
    # Arithmetic shifts on int8 sign-extend each nibble.
    low = (packed << 4) >> 4
    high = packed >> 4
    out = torch.stack((low, high), dim=-2)  # [..., N/2, 2, K]
    return out.reshape(*packed.shape[:-2], packed.shape[-2] * 2, packed.shape[-1])
