"""The backend interface and backend selection."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

BACKEND_ENV = "W4A8MOE_BACKEND"


@dataclass
class PackedExpertWeights:
    """All routed experts of one layer, packed as on disk (SPEC section 4).

    ``w13``: int8 ``[E, I, H]``, gate then up stacked along N (``2I`` channels) and packed
    in output-channel pairs; ``w13_scale``: fp32 ``[E, 2I]``; ``w2``: int8 ``[E, H/2, I]``;
    ``w2_scale``: fp32 ``[E, H]``.
    """

    w13: torch.Tensor
    w13_scale: torch.Tensor
    w2: torch.Tensor
    w2_scale: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w13.shape[2]

    @property
    def intermediate_size(self) -> int:
        return self.w13.shape[1]


@dataclass
class PreparedExperts:
    """A layer's routed experts as one backend multiplies them (its ``prepare_experts``):
    the gate|up weight ``w13`` and down weight ``w2`` in the backend's own layout (its
    subclass says which), their fp32 scales, and the shapes they stand for."""

    w13: torch.Tensor
    w13_scale: torch.Tensor
    w2: torch.Tensor
    w2_scale: torch.Tensor
    num_experts: int
    hidden_size: int
    intermediate_size: int


class ExpertBackend(Protocol):
    """What the MoE layer needs from a kernel backend."""

    name: str

    def prepare(self, weights: PackedExpertWeights) -> object:
        """Return the backend's own view of the weights (a re-layout done once at load)."""

    def grouped_forward(
        self,
        prepared: object,
        x_q: torch.Tensor,
        x_scale: torch.Tensor,
        token_ids: torch.Tensor,
        expert_offsets: torch.Tensor,
        alpha: torch.Tensor,
    ) -> torch.Tensor:
        """Run the expert path for routed rows.

        ``x_q`` int8 ``[M, H]`` and ``x_scale`` fp32 ``[M, 1]`` are the per-token quantized
        layer input; row ``r`` of the output (bf16 ``[R, H]``) is expert ``e``'s output for
        token ``token_ids[r]``, where ``expert_offsets[e] <= r < expert_offsets[e + 1]``.
        ``alpha`` fp32 ``[E]`` holds the activation clips (all ones to disable).
        """

    def combined_forward(
        self,
        prepared: object,
        x_q: torch.Tensor,
        x_scale: torch.Tensor,
        token_ids: torch.Tensor,
        expert_offsets: torch.Tensor,
        alpha: torch.Tensor,
        row_weights: torch.Tensor,
    ) -> torch.Tensor:
        """The expert path and the weighted sum per token: fp32 ``[M, H]``, bit-identical to
        ``combine_rows(grouped_forward(...), token_ids, row_weights, M)``.

        ``row_weights`` fp32 ``[R]`` is row ``r``'s routing weight.
        """

    def gate_up_rows(
        self,
        prepared: object,
        x_q: torch.Tensor,
        x_scale: torch.Tensor,
        token_ids: torch.Tensor,
        expert_offsets: torch.Tensor,
    ) -> torch.Tensor:
        """GMM1 alone: bf16 ``[R, 2I]``, row ``r`` = ``scaled_int_matmul`` of token
        ``token_ids[r]`` with its expert's ``w13`` (the bits :meth:`grouped_forward` uses).

        With :meth:`down_rows_int32` it is the expert path split at the clip, for
        tensor-parallel ranks that must agree on each row's max first (SPEC 7b).
        """

    def down_rows_int32(self, prepared: object, h_q: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
        """GMM2's exact accumulation: int32 ``[R, H]``, row ``r`` = ``h_q[r] @ q_w2[e]^T`` for the
        expert ``e`` of row ``r`` (scales not applied, so that ranks can sum partial results)."""

    def int8_linear_int32(self, prepared: object, x_q: torch.Tensor) -> torch.Tensor:
        """A prepared W8A8 Linear's exact accumulation: int32 ``[M, N]`` = ``x_q @ W^T``."""

    def quantize_per_token(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bit-identical to :func:`w4a8moe.quant.dynamic_quant_per_token` of ``x`` ``[M, K]``."""

    def prepare_int8_linear(self, weight_q: torch.Tensor, weight_scale: torch.Tensor) -> object:
        """Return the backend's own view of a W8A8 Linear: int8 ``[N, K]``, fp32 scales ``[N]``."""

    def int8_linear(self, prepared: object, x_q: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """bf16 ``[M, N]``, bit-identical to :func:`w4a8moe.quant.scaled_int_matmul` of ``x_q``
        int8 ``[M, K]``, ``x_scale`` fp32 ``[M, 1]`` and the prepared weight."""

    def int_matmul(self, a_q: torch.Tensor, b_q: torch.Tensor) -> torch.Tensor:
        """Exact ``a_q @ b_q.T`` for int8 ``a_q`` ``[M, K]`` and ``b_q`` ``[N, K]``: int32 ``[M, N]``,
        equal to :func:`w4a8moe.quant.int8_matmul_int32` (the clip search's products)."""


def holds_int8_weight(backend: object) -> bool:
    """Whether ``backend``'s prepared W8A8 Linear is a copy of the int8 weight it can decode
    back (``int8_linear_weight``: the native CPU kernel's layout), so that the caller can drop
    its own: the weight is then held once."""
    return callable(getattr(backend, "int8_linear_weight", None))


def combine_rows(rows: torch.Tensor, token_ids: torch.Tensor, row_weights: torch.Tensor,
                 num_tokens: int) -> torch.Tensor:
    """``out[t] = sum of row_weights[r] * rows[r]`` over the rows ``r`` of token ``t``: fp32
    ``[num_tokens, H]``.

    The order is part of the definition, so that every backend gets the same bits: each
    product is an fp32 multiply of the bf16 row by its weight, added in increasing ``r`` onto
    zeros (``index_add_`` adds in index order).
    """
    out = torch.zeros((num_tokens, rows.shape[-1]), dtype=torch.float32, device=rows.device)
    out.index_add_(0, token_ids, rows.to(torch.float32) * row_weights.to(torch.float32).reshape(-1, 1))
    return out


_FACTORIES: dict[str, Callable[[], ExpertBackend | None]] = {}
_PREFERENCE: list[str] = []
_DEVICES: dict[str, tuple[str, ...]] = {}


def register_backend(name: str, factory: Callable[[], ExpertBackend | None], priority: int,
                     devices: tuple[str, ...] = ("cpu",)) -> None:
    """Register a backend factory; it returns ``None`` where the backend cannot run here.

    ``devices``: the tensor device types (``"cpu"``, ``"cuda"``) the backend is chosen for
    automatically; a backend named explicitly runs wherever its factory allows.
    """
    _FACTORIES[name] = factory
    _DEVICES[name] = tuple(devices)
    if name not in _PREFERENCE:
        _PREFERENCE.insert(min(priority, len(_PREFERENCE)), name)


def _device_type(device: torch.device | str | None) -> str:
    return torch.device(device).type if device is not None else "cpu"


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that can run on this machine for ``device`` (default CPU), fastest first."""
    _load_builtin()
    kind = _device_type(device)
    return [n for n in _PREFERENCE if kind in _DEVICES[n] and _FACTORIES[n]() is not None]


def get_backend(name: str | None = None, device: torch.device | str | None = None) -> ExpertBackend:
    """The backend named by ``name``, else by ``$W4A8MOE_BACKEND``, else the fastest available
    for tensors on ``device`` (default CPU). A named backend must run on CUDA tensors when
    ``device`` is CUDA; on CPU tensors any may be named (``triton`` under its interpreter)."""
    _load_builtin()
    name = name or os.environ.get(BACKEND_ENV) or None
    if name is not None:
        if name not in _FACTORIES:
            raise ValueError(f"unknown backend {name!r}; known: {sorted(_FACTORIES)}")
        if device is not None and _device_type(device) == "cuda" and "cuda" not in _DEVICES[name]:
            raise ValueError(f"backend {name!r} does not run on CUDA tensors; for them use one of "
                             f"{[n for n in _PREFERENCE if 'cuda' in _DEVICES[n]]}")
        backend = _FACTORIES[name]()
        if backend is None:
            raise RuntimeError(f"backend {name!r} cannot run on this machine")
        return backend
    kind = _device_type(device)
    for candidate in _PREFERENCE:
        if kind not in _DEVICES[candidate]:
            continue
        backend = _FACTORIES[candidate]()
        if backend is not None:
            return backend
    raise RuntimeError(f"no expert backend available for {kind} tensors")


def int_matmul_backend(device: torch.device | str | None = None):
    """A backend whose :meth:`ExpertBackend.int_matmul` runs on ``device`` (default CPU).

    :func:`get_backend` for ``device`` (the native kernel on the CPU, Triton on CUDA), except
    that on CUDA without Triton :class:`w4a8moe.kernels.cuda_int_mm.CudaIntMatmul`
    (``torch._int_mm``) replaces the reference backend's float64 products. Either way the
    products are exact int32, so the clip search gives the same integers on every device.
    """
    kind = _device_type(device)
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"no exact integer matmul for device {device!r} (expected cpu or cuda)")
    if kind == "cuda" and not torch.cuda.is_available():
        # Checked here, not by the backend: Triton's interpreter would run "CUDA" on the CPU.
        raise RuntimeError(f"device {device} requested, but torch sees no CUDA device")
    backend = get_backend(device=device)
    if kind == "cuda" and backend.name == "reference":
        from w4a8moe.kernels.cuda_int_mm import CudaIntMatmul

        return CudaIntMatmul(torch.device(device))
    return backend


def _load_builtin() -> None:
    # Imported here so that registering never happens at package import time for unused backends.
    from w4a8moe.kernels import cpu, reference, triton_backend  # noqa: F401
