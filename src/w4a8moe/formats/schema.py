"""Tensor names, dtypes and shapes of the two W4A8 checkpoint formats (SPEC sections 5, 6).

One table per format says what each expert projection and each W8A8 linear must hold;
the writer produces exactly these tensors and the reader checks exactly these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from w4a8moe.quant import (
    KERNEL_BIAS_CHUNKS,
    encode_scale_uint64,
    kernel_bias_packed,
)

ASCENDV1 = "ascendv1"
COMPRESSED_TENSORS = "compressed-tensors"
FORMATS = (ASCENDV1, COMPRESSED_TENSORS)

SCALE_DTYPES = (torch.float32, torch.uint64)
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class TensorSpec:
    """What one tensor must be: allowed dtypes and exact shape (``None`` in a slot: any)."""

    dtypes: tuple[torch.dtype, ...]
    shapes: tuple[tuple[int, ...], ...]

    def describe(self) -> str:
        dts = "/".join(str(d).replace("torch.", "") for d in self.dtypes)
        shp = " or ".join(str(list(s)) for s in self.shapes)
        return f"{dts} {shp}"


def expert_projection_specs(fmt: str, proj: str, n: int, k: int, hidden: int, with_alpha: bool) -> dict[str, TensorSpec]:
    """Suffix -> spec for one routed expert projection with unpacked weight ``[N, K]``."""
    specs = {
        "weight": TensorSpec((torch.int8,), ((n // 2, k),)),
        "weight_scale": TensorSpec(SCALE_DTYPES, ((n, 1),)),
    }
    if fmt == ASCENDV1:
        specs["weight_offset"] = TensorSpec((torch.float32,), ((n, 1),))
        bias_shape = (hidden, KERNEL_BIAS_CHUNKS) if proj == "down" else (n, 1)
        specs["scale_bias"] = TensorSpec((torch.float32,), (bias_shape,))
    else:
        specs["bias"] = TensorSpec((torch.float32,), ((n,),))
        if proj == "down" and with_alpha:
            specs["alpha"] = TensorSpec((torch.float32,), ((), (1,)))
    return specs


def w8a8_linear_specs(fmt: str, n: int, k: int) -> dict[str, TensorSpec]:
    """Suffix -> spec for a W8A8-dynamic Linear with weight ``[N, K]``."""
    specs = {
        "weight": TensorSpec((torch.int8,), ((n, k),)),
        "weight_scale": TensorSpec((torch.float32, torch.bfloat16), ((n, 1),)),
    }
    if fmt == ASCENDV1:
        specs["weight_offset"] = TensorSpec((torch.float32, torch.bfloat16), ((n, 1),))
    return specs


def expert_projection_tensors(
    fmt: str, proj: str, packed: torch.Tensor, scale: torch.Tensor, alpha: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Suffix -> tensor for one expert projection, as ``fmt`` stores it.

    ``packed`` int8 ``[N/2, K]`` and ``scale`` fp32 ``[N]``; ``alpha`` is a 0-d fp32 tensor for
    the down projection of a clip-format checkpoint.
    """
    n = packed.shape[0] * 2
    scale = scale.to(torch.float32).reshape(n)
    out: dict[str, torch.Tensor] = {"weight": packed.contiguous()}
    if fmt == ASCENDV1:
        out["weight_scale"] = scale.reshape(n, 1).clone()
        out["weight_offset"] = torch.zeros(n, 1, dtype=torch.float32)
        if proj == "down":
            out["scale_bias"] = kernel_bias_packed(packed, scale, KERNEL_BIAS_CHUNKS)
        else:
            out["scale_bias"] = kernel_bias_packed(packed, scale).reshape(n, 1)
    else:
        out["weight_scale"] = encode_scale_uint64(scale.reshape(n, 1))
        out["bias"] = kernel_bias_packed(packed, scale)
        if proj == "down" and alpha is not None:
            out["alpha"] = alpha.to(torch.float32).reshape(()).clone()
    return out


def w8a8_linear_tensors(fmt: str, weight_q: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Suffix -> tensor for a W8A8-dynamic Linear."""
    n = weight_q.shape[0]
    out = {"weight": weight_q.contiguous(), "weight_scale": scale.to(torch.float32).reshape(n, 1).clone()}
    if fmt == ASCENDV1:
        out["weight_offset"] = torch.zeros(n, 1, dtype=torch.float32)
    return out
