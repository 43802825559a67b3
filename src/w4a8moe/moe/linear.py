"""W8A8 dynamic Linear: int8 per-channel weights, per-token int8 activations."""

from __future__ import annotations

import torch
from torch import nn

from w4a8moe.kernels import ExpertBackend, get_backend


class W8A8Linear(nn.Module):
    """A bias-free Linear whose weight is int8 ``[N, K]`` with fp32 scales ``[N]``.

    The integer matmul runs on a kernel backend (``backend=None``: ``$W4A8MOE_BACKEND`` or the
    fastest available), exact in int32 like :func:`w4a8moe.quant.w8a8_linear`, so the output
    is the same bits on every backend. The native CPU backend keeps its own re-laid 8-bit copy
    of the weight beside ``weight`` (which stays the module's state): W8A8 Linears cost twice
    their int8 size in memory, the routed experts (held once, at 4 bits) do not.
    """

    def __init__(self, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                 backend: str | ExpertBackend | None = None):
        super().__init__()
        if weight_q.dtype != torch.int8 or weight_q.dim() != 2:
            raise ValueError(f"W8A8Linear needs an int8 [N, K] weight, got {weight_q.dtype} {tuple(weight_q.shape)}")
        self.register_buffer("weight", weight_q)
        self.register_buffer("weight_scale", weight_scale.reshape(-1).to(torch.float32))
        self.in_features = weight_q.shape[1]
        self.out_features = weight_q.shape[0]
        self.set_backend(backend)

    def set_backend(self, backend: str | ExpertBackend | None = None) -> None:
        """Choose the kernel backend (``None``: ``$W4A8MOE_BACKEND`` or the fastest available for
        the weight's device).

        Call it again after replacing ``weight``: the backend's copy is made here."""
        chosen = (backend if (backend is not None and not isinstance(backend, str))
                  else get_backend(backend, self.weight.device))
        self._prepared = chosen.prepare_int8_linear(self.weight, self.weight_scale)
        self.backend = chosen
        self._prepared_device = self.weight.device

    @property
    def prepared(self) -> object:
        """The weight as the backend multiplies it (its ``prepare_int8_linear``)."""
        return self._prepared

    def _apply(self, fn, recurse=True):
        # ``module.to(device)`` moves the buffers; the backend's copy is remade for the new device.
        out = super()._apply(fn, recurse)
        if self.weight.device != self._prepared_device:
            self.set_backend()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x_q, x_scale = self.backend.quantize_per_token(x.reshape(-1, x.shape[-1]))
        return self.backend.int8_linear(self._prepared, x_q, x_scale).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, w8a8_dynamic, "
                f"backend={self.backend.name}")
