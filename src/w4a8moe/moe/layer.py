"""The W4A8 MoE layer: routing, packed int4 experts with the activation clip, shared expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from w4a8moe.formats.layer_tensors import QuantizedMoELayer
from w4a8moe.formats.model_config import RoutingConfig
from w4a8moe.kernels import ExpertBackend, PackedExpertWeights, get_backend
from w4a8moe.moe.linear import W8A8Linear
from w4a8moe.moe.routing import route, sort_rows_by_expert
from w4a8moe.quant import silu_and_mul


class PackedExperts(nn.Module):
    """Routed experts held packed (4 bits per weight) with their scales and clips.

    Buffers: ``w13`` int8 ``[E, I, H]`` (gate then up, packed pairs), ``w13_scale`` fp32
    ``[E, 2I]``, ``w2`` int8 ``[E, H/2, I]``, ``w2_scale`` fp32 ``[E, H]``, ``alpha`` fp32 ``[E]``.
    After :meth:`release_packed` the two weight buffers are ``None``: a backend that re-laid
    the weights holds the only copy, so expert memory stays at 4 bits per weight.
    """

    def __init__(self, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor,
                 alpha: torch.Tensor):
        super().__init__()
        e, inter, hidden = w13.shape
        expected = {
            "w13": (w13, torch.int8, (e, inter, hidden)),
            "w13_scale": (w13_scale, torch.float32, (e, 2 * inter)),
            "w2": (w2, torch.int8, (e, hidden // 2, inter)),
            "w2_scale": (w2_scale, torch.float32, (e, hidden)),
            "alpha": (alpha, torch.float32, (e,)),
        }
        for name, (t, dtype, shape) in expected.items():
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(f"PackedExperts.{name}: expected {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")
            self.register_buffer(name, t.contiguous())
        self.num_experts, self.intermediate_size, self.hidden_size = e, inter, hidden

    @property
    def released(self) -> bool:
        """Whether the on-disk packed weights were dropped in favour of a backend's layout."""
        return self.w13 is None

    def release_packed(self) -> None:
        """Drop the SPEC-4 packed weights (scales and clips stay)."""
        self.register_buffer("w13", None)
        self.register_buffer("w2", None)

    def weights(self) -> PackedExpertWeights:
        """The packed weights as the kernel interface takes them."""
        if self.released:
            raise RuntimeError(
                "the packed expert weights were released after a backend re-laid them; rebuild the layer "
                "(or build it with keep_packed=True) to switch backends"
            )
        return PackedExpertWeights(self.w13, self.w13_scale, self.w2, self.w2_scale)


class GatedMLP(nn.Module):
    """``down(silu_and_mul(gate(x), up(x)))`` with any Linear-like projections (W8A8 or bf16).

    The activation is :func:`~w4a8moe.quant.silu_and_mul`: fp32 from the projections' bf16
    outputs, rounded once (SPEC 1), as the engines run a shared expert or dense MLP.

    Two :class:`W8A8Linear` gate and up projections are stacked into one ``gate_up_proj``
    ``[2I, K]`` (the fused projection of the engines): one quantization of ``x`` and one GEMM
    that streams both weights, the same bits as the two (output channels are independent);
    ``gate_proj`` and ``up_proj`` are then ``None``. With a W8A8 ``down_proj`` too, on a backend
    that offers ``gated_mlp_int8`` (the native CPU kernel), the whole MLP is that one call.
    """

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module):
        super().__init__()
        self.gate_up_proj: W8A8Linear | None = None
        if (type(gate_proj) is W8A8Linear and type(up_proj) is W8A8Linear
                and gate_proj.in_features == up_proj.in_features
                and type(gate_proj.backend) is type(up_proj.backend)
                and gate_proj.weight_scale.device == up_proj.weight_scale.device):
            self.gate_up_proj = W8A8Linear(torch.cat((gate_proj.weight, up_proj.weight)),
                                           torch.cat((gate_proj.weight_scale, up_proj.weight_scale)),
                                           backend=gate_proj.backend)
            self.intermediate_size = gate_proj.out_features
            gate_proj = up_proj = None
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    STACKED = ("gate_proj", "up_proj")
    """The projections ``gate_up_proj`` stacks, in its row order."""

    @classmethod
    def source_projection_names(cls, name: str) -> list[str]:
        """The module paths of the separate projections behind ``name``: those of
        :attr:`STACKED` for a ``...gate_up_proj``, else ``name`` itself."""
        parent, _, leaf = name.rpartition(".")
        if leaf != "gate_up_proj":
            return [name]
        return [f"{parent}.{p}" if parent else p for p in cls.STACKED]

    def forward(self, x: torch.Tensor, quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``quantized``: :func:`~w4a8moe.quant.dynamic_quant_per_token` of ``x``'s rows, where
        the caller has it already (a MoE block's routed experts quantize the same input)."""
        if self.gate_up_proj is not None:
            fused = self._one_call(x, quantized)
            if fused is not None:
                return fused
            gate_up = self.gate_up_proj(x)
            inter = self.intermediate_size
            return self.down_proj(silu_and_mul(gate_up[..., :inter], gate_up[..., inter:]))
        return self.down_proj(silu_and_mul(self.gate_proj(x), self.up_proj(x)))

    def native_projections(self) -> tuple[object, object] | None:
        """``(gate_up, down)`` as their backend prepared them, where that backend runs the whole
        MLP as one call (``gated_mlp_int8``: the native CPU kernel, both projections W8A8 on
        it), else ``None``."""
        if self.gate_up_proj is None or type(self.down_proj) is not W8A8Linear:
            return None
        backend = self.gate_up_proj.backend
        if getattr(backend, "gated_mlp_int8", None) is None or type(self.down_proj.backend) is not type(backend):
            return None
        return self.gate_up_proj.prepared, self.down_proj.prepared

    def _one_call(self, x: torch.Tensor, quantized: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor | None:
        # The whole MLP as one backend call where the backend has one (the native CPU kernel):
        # at decode the gaps between three GEMMs and the torch ops of the activation cost a
        # third of the time of the weights' reads. The same bits; None: run the modules.
        projections = self.native_projections()
        if projections is None:
            return None
        backend = self.gate_up_proj.backend
        lead = x.shape[:-1]
        x_q, x_scale = quantized if quantized is not None else backend.quantize_per_token(x.reshape(-1, x.shape[-1]))
        out = backend.gated_mlp_int8(*projections, x_q, x_scale)
        return None if out is None else out.reshape(*lead, self.down_proj.out_features)


class SharedExpert(GatedMLP):
    """A MoE block's shared expert: a :class:`GatedMLP`.

    With ``gate_weight`` (Qwen2-MoE's ``shared_expert_gate``) the output is scaled by
    ``sigmoid(x @ gate_weight^T)``.
    """

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module,
                 gate_weight: torch.Tensor | None = None):
        super().__init__(gate_proj, up_proj, down_proj)
        if gate_weight is not None:
            self.register_buffer("expert_gate", gate_weight)
        else:
            self.expert_gate = None

    def forward(self, x: torch.Tensor, quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        out = super().forward(x, quantized)
        if self.expert_gate is not None:
            out = torch.sigmoid(F.linear(x, self.expert_gate.to(x.dtype))) * out
        return out


def shared_expert_from_quantized(shared: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None,
                                 gate_weight: torch.Tensor | None = None,
                                 device: torch.device | None = None,
                                 backend: str | ExpertBackend | None = None) -> SharedExpert | None:
    """The shared expert of a :class:`QuantizedMoELayer` (``shared[p]`` is ``(weight, scale)``:
    W8A8, or a bf16 Linear where ``scale`` is ``None``) as a module on ``device`` (default: where
    the tensors are), its W8A8 projections on ``backend`` (see :class:`W8A8Linear`); ``None``
    without one."""
    if shared is None:
        return None

    def place(t: torch.Tensor | None) -> torch.Tensor | None:
        return t if (t is None or device is None) else t.to(device)

    projections = []
    for proj in ("gate", "up", "down"):
        weight, scale = shared[proj]
        if scale is None:
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.bfloat16,
                               device=weight.device if device is None else device)
            linear.weight.data.copy_(weight)
            linear.requires_grad_(False)
            projections.append(linear)
        else:
            projections.append(W8A8Linear(place(weight), place(scale), backend=backend))
    return SharedExpert(*projections, gate_weight=place(gate_weight))


class W4A8MoE(nn.Module):
    """A MoE block with W4A8 routed experts and the learned activation clip of SPEC 1-3.

    ``forward(x)`` takes bf16 ``[M, H]`` (or ``[..., H]``) and returns bf16 of the same shape:
    ``shared(x) + routed_scaling_factor * sum_k w_k * expert_k(x)``, the sum formed in fp32.
    ``apply_alpha=False`` ignores the activation clips, as the upstream sglang NPU path does.
    When the backend re-lays the weights (the native CPU kernel does), the on-disk packed
    copy is released so that experts are held once, at 4 bits per weight; ``keep_packed=True``
    keeps it (needed only to switch backends later with :meth:`set_backend`).
    """

    def __init__(self, router_weight: torch.Tensor, routing: RoutingConfig, experts: PackedExperts,
                 correction_bias: torch.Tensor | None = None, shared: nn.Module | None = None,
                 apply_alpha: bool = True, backend: str | ExpertBackend | None = None, keep_packed: bool = False):
        super().__init__()
        if router_weight.shape != (routing.num_experts, experts.hidden_size):
            raise ValueError(
                f"router weight: expected [{routing.num_experts}, {experts.hidden_size}], got {list(router_weight.shape)}"
            )
        if experts.num_experts != routing.num_experts:
            raise ValueError(f"{experts.num_experts} experts given, routing expects {routing.num_experts}")
        self.routing = routing
        # Held in fp32, exact for a bf16 router: routing runs in fp32 (SPEC 3), and converting
        # the weight on every call made a fresh copy per token step (twice its bytes, read again).
        self.register_buffer("router_weight", router_weight.to(torch.float32))
        if correction_bias is not None:
            self.register_buffer("correction_bias", correction_bias.to(torch.float32))
        else:
            self.correction_bias = None
        self.experts = experts
        self.shared = shared
        self.apply_alpha = apply_alpha
        self.keep_packed = keep_packed
        self.set_backend(backend)

    @classmethod
    def from_quantized(cls, layer: QuantizedMoELayer, routing: RoutingConfig, apply_alpha: bool = True,
                       backend: str | ExpertBackend | None = None, keep_packed: bool = False,
                       device: torch.device | str | None = None) -> "W4A8MoE":
        """Build the module from a layer's quantized tensors (as a checkpoint or the converter holds them).

        ``device`` (default: where the tensors are) is where the module and its backend's
        weights live; the backend is chosen for it (``triton`` on CUDA).
        """
        def place(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if (t is None or device is None) else t.to(device)

        experts = PackedExperts(
            w13=torch.cat((place(layer.packed["gate"]), place(layer.packed["up"])), dim=1),
            w13_scale=torch.cat((place(layer.scale["gate"]), place(layer.scale["up"])), dim=1),
            w2=place(layer.packed["down"]),
            w2_scale=place(layer.scale["down"]),
            alpha=place(layer.alpha),
        )
        shared = shared_expert_from_quantized(layer.shared, layer.shared_expert_gate, device, backend)
        return cls(place(layer.router_weight), routing, experts, place(layer.correction_bias), shared, apply_alpha,
                   backend, keep_packed)

    def set_backend(self, backend: str | ExpertBackend | None = None) -> None:
        """Choose the kernel backend (``None``: ``$W4A8MOE_BACKEND`` or the fastest available for
        the device the experts are on)."""
        device = self.experts.alpha.device
        chosen = backend if (backend is not None and not isinstance(backend, str)) else get_backend(backend, device)
        prepared = chosen.prepare(self.experts.weights())
        self.backend, self._prepared = chosen, prepared
        if not isinstance(prepared, PackedExpertWeights) and not self.keep_packed:
            self.experts.release_packed()
        self._prepared_device = device

    def _apply(self, fn, recurse=True):
        # ``module.to(device)``: the backend's weights must follow, which needs the packed copy.
        out = super()._apply(fn, recurse)
        if self.experts.alpha.device != self._prepared_device:
            if self.experts.released:
                raise RuntimeError(
                    f"W4A8MoE moved to {self.experts.alpha.device} after its backend released the packed "
                    f"weights on {self._prepared_device}; load on the target device instead "
                    "(load_model(path, device=...)) or build the layer with keep_packed=True"
                )
            self.set_backend()
        return out

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits in fp32, then expert choice: ``(weights fp32 [M, k], ids int64 [M, k])``."""
        return route(x, self.router_weight, self.routing, self.correction_bias, self.backend)

    def routed_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                       quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``sum_k w_k * expert_k(x)`` in fp32 ``[M, H]``, without the scaling factor
        (``quantized``: ``x``'s per-token quantization, where the caller has it)."""
        if ids.shape[0] == 0:
            return torch.zeros((0, x.shape[-1]), dtype=torch.float32, device=x.device)
        rows = sort_rows_by_expert(ids, self.routing.num_experts, weights, self.backend)
        x_q, x_scale = quantized if quantized is not None else self.backend.quantize_per_token(x)
        return self.backend.combined_forward(self._prepared, x_q, x_scale, rows.token_ids, rows.offsets,
                                             self._alpha(), rows.row_weights)

    def _alpha(self) -> torch.Tensor:
        """The activation clips the experts run with: the learned ones, or all 1 where
        ``apply_alpha`` is off."""
        return self.experts.alpha if self.apply_alpha else torch.ones_like(self.experts.alpha)

    def _one_call(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
        # The input's quantization, the routed experts, the shared expert and their sum as one
        # backend call where the backend has one (the native CPU kernel): at decode, between a
        # decoder layer's torch work, each separate call and torch op runs on cold caches and
        # the threads wait at each call's end. The same bits; None: run the parts.
        block = getattr(self.backend, "moe_block", None)
        if block is None or x.shape[0] == 0:
            return None
        projections = None
        if self.shared is not None:
            if type(self.shared) not in (GatedMLP, SharedExpert) or getattr(self.shared, "expert_gate", None) is not None:
                return None
            projections = self.shared.native_projections()
            if projections is None or type(self.shared.gate_up_proj.backend) is not type(self.backend):
                return None
        return block(self._prepared, x, weights, ids, self._alpha(), self.routing.routed_scaling_factor, projections)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        weights, ids = self.route(x2)
        fused = self._one_call(x2, weights, ids)
        if fused is not None:
            return fused.reshape(shape)
        # One quantization of the input for the routed experts and a W8A8 shared expert.
        quantized = self.backend.quantize_per_token(x2)
        # In place on the fp32 sum (the same bits as out-of-place): no more [M, H] temporaries.
        out = self.routed_experts(x2, weights, ids, quantized).mul_(self.routing.routed_scaling_factor)
        if self.shared is not None:
            shared = self.shared(x2, quantized) if isinstance(self.shared, GatedMLP) else self.shared(x2)
            out.add_(shared.to(torch.float32))
        return out.to(torch.bfloat16).reshape(shape)

    def extra_repr(self) -> str:
        r = self.routing
        return (f"experts={r.num_experts}, top_k={r.top_k}, routing={r.method}, "
                f"apply_alpha={self.apply_alpha}, backend={self.backend.name}")
