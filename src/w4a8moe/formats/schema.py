"""Tensor specs: the dtypes and exact shapes a stored tensor may have.

Each format object (:mod:`w4a8moe.formats.base`) says, with these, what each expert
projection and each W8A8 Linear must hold; the writer produces exactly these tensors and the
reader checks exactly these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
