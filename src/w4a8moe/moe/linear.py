"""W8A8 dynamic Linear: int8 per-channel weights, per-token int8 activations."""

from __future__ import annotations

import torch
from torch import nn

from w4a8moe.kernels import ExpertBackend, get_backend
from w4a8moe.kernels.base import holds_int8_weight


class W8A8Linear(nn.Module):
    """A bias-free Linear whose weight is int8 ``[N, K]`` with fp32 scales ``[N]``.

    The integer matmul runs on a kernel backend (``backend=None``: ``$W4A8MOE_BACKEND`` or the
    fastest available), exact in int32 like :func:`w4a8moe.quant.w8a8_linear`, so the output
    is the same bits on every backend. A backend that re-lays the weight into a layout of its
    own and can decode it (the native CPU kernel: ``int8_linear_weight``) holds the only copy,
    so the Linear costs its int8 size once: the module's ``weight`` buffer is then ``None`` in
    ``_buffers``, and ``weight`` (attribute, :meth:`int8_weight`, ``state_dict``) is decoded
    from the layout, exactly, into a new tensor at each access.
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
        weight = self.int8_weight()
        chosen = (backend if (backend is not None and not isinstance(backend, str))
                  else get_backend(backend, weight.device))
        self._prepared = chosen.prepare_int8_linear(weight, self.weight_scale)
        self.backend = chosen
        self._prepared_device = weight.device
        self._buffers["weight"] = None if holds_int8_weight(chosen) else weight

    def int8_weight(self) -> torch.Tensor:
        """The int8 ``[N, K]`` weight: the buffer, or decoded from the backend's layout where that
        is the only copy (exact; a new tensor)."""
        weight = self._buffers.get("weight")
        return weight if weight is not None else self.backend.int8_linear_weight(self._prepared)

    def __getattr__(self, name: str):
        # ``weight`` reads as the int8 weight whether the buffer or the backend holds it.
        if name == "weight" and self.__dict__.get("_buffers", {}).get("weight", 0) is None:
            return self.int8_weight()
        return super().__getattr__(name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._buffers.get("weight") is None:
            destination[prefix + "weight"] = self.int8_weight()

    @property
    def prepared(self) -> object:
        """The weight as the backend multiplies it (its ``prepare_int8_linear``)."""
        return self._prepared

    def _apply(self, fn, recurse=True):
        # ``module.to(device)`` moves the buffers; the backend's copy is remade for the new device
        # (from the weight, put back in its buffer for the move where the backend held it).
        if self._buffers.get("weight") is None:
            self._buffers["weight"] = self.int8_weight()
        out = super()._apply(fn, recurse)
        weight = self._buffers["weight"]
        if weight.device != self._prepared_device:
            self.set_backend()
        elif holds_int8_weight(self.backend):
            self._buffers["weight"] = None
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x_q, x_scale = self.backend.quantize_per_token(x.reshape(-1, x.shape[-1]))
        return self.backend.int8_linear(self._prepared, x_q, x_scale).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, w8a8_dynamic, "
                f"backend={self.backend.name}")
