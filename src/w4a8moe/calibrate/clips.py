"""Learning the weight clips ``alpha_w`` and the activation clip ``alpha_e`` of one expert.

Everything is judged on the expert's *output*: the float reference is
``W_down (silu(W_gate x) * W_up x)`` in fp32 from the unquantized weights, and the quantized
output is computed exactly as the runtime does (:mod:`w4a8moe.quant`: per-token int8 input,
int4 GMM1 with bf16 output, SwiGLU-clip-quant, int4 GMM2 with bf16 output). The objective is
the sum of squared output errors over the tokens the router sends to the expert.

Search, per expert, on the "fit" part of its routed tokens:

1. gate and up weight clips, per output channel, on the projection outputs (with the
   quantized activations; channels are independent, so a per-channel grid argmin is the
   exact minimum over the grid product);
2. down-projection weight clips per output channel with ``alpha_e = 1`` (output channel ``n``
   of the down projection *is* output channel ``n`` of the expert, so this minimises the
   expert output error channel by channel);
3. ``alpha_e`` on a grid, then refined by gradient descent through a straight-through
   estimator of the rounding (kept only where the exact error improves); the gradient is
   taken through the down weight's Gram matrix (``refine_form="gram"``, converter version 2)
   or, as version 1 did, through the two matmuls of the direct form (``"direct"``);
4. the down clips again, given the chosen ``alpha_e``.

The pair (``alpha_e``, down clips of step 4) is accepted only if it does not worsen the
held-out part of the routed tokens against (1, down clips of step 2). With ``gptq`` the
integer values are then re-chosen by GPTQ with act-order under the searched scales
(:mod:`w4a8moe.calibrate.gptq`), kept only if the held-out error does not get worse. Finally the whole
learned expert is compared with round-to-nearest (all clips 1) on all routed tokens and the
expert falls back to round-to-nearest if learning did not help, so learned clips are never
worse than RTN on the calibration objective.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from w4a8moe.calibrate.gptq import gptq_int4
from w4a8moe.calibrate.products import Int4Operand, IntProducts
from w4a8moe.quant import (
    INT4_MAX,
    INT8_MAX,
    checked_channel_amax,
    clip_quant_rows,
    dequantize_per_channel,
    dynamic_quant_per_token,
    fake_quantize_with_scale,
    per_channel_scale,
    quantize_int4_per_channel,
    scale_int32,
    swiglu_clip_quant,
    swiglu_fp32,
)

DEFAULT_WEIGHT_CLIP_GRID = tuple(round(1.0 - 0.025 * i, 4) for i in range(21))  # 1.0 .. 0.5
DEFAULT_ALPHA_GRID = tuple(round(1.0 - 0.05 * i, 4) for i in range(17))  # 1.0 .. 0.2
DEFAULT_MIN_EXPERT_TOKENS = 16
"""Experts routed fewer calibration tokens than this keep every clip at 1 (and are reported)."""
HELDOUT_EVERY = 4
"""Every 4th routed token (by position) is held out from fitting to judge the activation clip."""
ALPHA_MIN = 0.05
REFINE_EVAL_EVERY = 5
REFINE_FORMS = ("gram", "direct")
GRID_GROUP = 4
"""Grid points quantized together, in one pass over the weight (their operands held at once)."""


@dataclass(frozen=True)
class ClipSearchSettings:
    """How clips are learned; all grids must start at 1.0 (the round-to-nearest choice)."""

    weight_clip_grid: tuple[float, ...] = DEFAULT_WEIGHT_CLIP_GRID
    alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID
    refine_steps: int = 40
    refine_lr: float = 0.02
    min_expert_tokens: int = DEFAULT_MIN_EXPERT_TOKENS
    learn_weight_clip: bool = True
    learn_alpha: bool = True
    gptq: bool = False
    refine_form: str = "gram"
    """How the refinement's gradient is computed (the same gradient, other roundings):
    ``gram`` through ``W^T W`` (one ``[M, I] x [I, I]`` matmul a step, about a third of the
    work at DeepSeek-V3 shapes) or ``direct`` through the output (two ``[M, I] x [I, H]``
    matmuls a step: converter version 1's bits)."""

    def __post_init__(self) -> None:
        if self.refine_form not in REFINE_FORMS:
            raise ValueError(f"refine_form must be one of {REFINE_FORMS}, got {self.refine_form!r}")
        if self.refine_steps < 0:
            raise ValueError(f"refine_steps must be >= 0, got {self.refine_steps}")
        for name in ("weight_clip_grid", "alpha_grid"):
            grid = getattr(self, name)
            if not grid or grid[0] != 1.0 or any(not (0.0 < g <= 1.0) for g in grid):
                raise ValueError(f"{name} must start at 1.0 and lie in (0, 1], got {grid}")
        if self.min_expert_tokens < 2:
            raise ValueError("min_expert_tokens must be >= 2 (one fit and one held-out token)")


@dataclass
class ExpertWeights:
    """One expert's float weights in fp32: gate/up ``[I, H]``, down ``[H, I]``."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


@dataclass
class ExpertClips:
    """The learned clips of one expert and the figures that justify them.

    ``weight_clip[p]`` fp32 ``[N]`` per projection; errors are summed squared output errors
    (``*_rtn``: all clips 1; ``*_learned``: the clips chosen), ``relative`` ones divided by
    the reference output's squared norm.
    """

    weight_clip: dict[str, torch.Tensor]
    alpha: float
    tokens: int
    status: str
    err_rtn: float = 0.0
    err_learned: float = 0.0
    ref_energy: float = 0.0
    heldout_err_rtn: float = 0.0
    heldout_err_learned: float = 0.0
    heldout_ref_energy: float = 0.0
    alpha_grid_best: float = 1.0
    notes: list[str] = field(default_factory=list)
    quantized: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    """With GPTQ: the int4 values (int8 ``[N, K]``) and scales ``[N]`` to store, else ``None``
    (the weights are round-to-nearest under the clips)."""

    def summary(self) -> dict:
        """JSON-ready figures for the conversion report."""
        def rel(err: float, energy: float) -> float | None:
            return err / energy if energy > 0 else None

        clips = {}
        for proj, c in self.weight_clip.items():
            clips[proj] = {
                "mean": round(float(c.mean()), 6),
                "min": round(float(c.min()), 6),
                "clipped_fraction": round(float((c < 1.0).to(torch.float32).mean()), 6),
            }
        return {
            "tokens": self.tokens,
            "status": self.status,
            "alpha": self.alpha,
            "alpha_grid_best": self.alpha_grid_best,
            "weight_clip": clips,
            "rel_err_rtn": rel(self.err_rtn, self.ref_energy),
            "rel_err_learned": rel(self.err_learned, self.ref_energy),
            "heldout_rel_err_rtn": rel(self.heldout_err_rtn, self.heldout_ref_energy),
            "heldout_rel_err_learned": rel(self.heldout_err_learned, self.heldout_ref_energy),
            "gptq": self.quantized is not None,
            "notes": list(self.notes),
        }


def expert_reference_output(x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """The float expert output ``W_down (silu(W_gate x) * W_up x)`` in fp32 ``[M, H]``."""
    return _reference_outputs(x, w)[1]


def _reference_outputs(x: torch.Tensor, w: ExpertWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp32 [gate | up] projections [M, 2I], the float expert output [M, H])``."""
    xf = x.to(torch.float32)
    gate_up = torch.cat((xf @ w.gate.T, xf @ w.up.T), dim=-1)
    return gate_up, swiglu_fp32(gate_up) @ w.down.T


def _gate_up(products: IntProducts, x_q: torch.Tensor, x_scale: torch.Tensor, gate: Int4Operand,
             up: Int4Operand) -> torch.Tensor:
    """GMM1 as the runtime runs it: int8 input x int4 gate|up, bf16 output ``[M, 2I]``.

    The int32 products of gate and up side by side are those of the stacked weight, so this
    is bit-identical to ``scaled_int_matmul(x_q, x_scale, cat(q_gate, q_up), cat(s_gate, s_up))``.
    """
    acc = torch.cat((products.int32(x_q, gate), products.int32(x_q, up)), dim=1)
    return scale_int32(acc, x_scale, torch.cat((gate.scale, up.scale)))


def _down(products: IntProducts, gate_up: torch.Tensor, alpha: float, down: Int4Operand) -> torch.Tensor:
    """SwiGLU-clip-quant then GMM2, as the runtime runs it (bf16 output)."""
    h_q, h_scale = swiglu_clip_quant(gate_up, alpha)
    return products.scaled(h_q, h_scale, down)


def _down_error(products: IntProducts, gate_up: torch.Tensor, alpha: float, down: Int4Operand,
                reference64: torch.Tensor) -> float:
    """``squared_error(_down(...), reference)`` with the reference already in float64."""
    h_q, h_scale = swiglu_clip_quant(gate_up, alpha)
    return float(products.squared_errors(h_q, h_scale, down, reference64).sum())


def quantized_gate_up(x_q: torch.Tensor, x_scale: torch.Tensor, q_gate: torch.Tensor, s_gate: torch.Tensor,
                      q_up: torch.Tensor, s_up: torch.Tensor, products: IntProducts | None = None) -> torch.Tensor:
    """GMM1 as the runtime runs it: int8 input x int4 gate|up, bf16 output ``[M, 2I]``."""
    products = products or IntProducts()
    return _gate_up(products, x_q, x_scale, products.values_operand(q_gate, s_gate),
                    products.values_operand(q_up, s_up))


def quantized_down(gate_up: torch.Tensor, alpha: float, q_down: torch.Tensor, s_down: torch.Tensor,
                   out_dtype: torch.dtype = torch.bfloat16, products: IntProducts | None = None) -> torch.Tensor:
    """SwiGLU-clip-quant then GMM2, as the runtime runs it (bf16 output by default)."""
    products = products or IntProducts()
    h_q, h_scale = swiglu_clip_quant(gate_up, alpha)
    return products.scaled(h_q, h_scale, products.values_operand(q_down, s_down), out_dtype)


def squared_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    """``sum (y - reference)^2`` in float64."""
    return float(((y.to(torch.float64) - reference.to(torch.float64)) ** 2).sum())


def _checked_amax(weight: torch.Tensor, backend: object | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight in fp32, its per-channel max |W|)``, checked finite once for all clips.

    Where ``backend`` offers ``row_absmax`` (the CPU kernel) and the weight is on the CPU, its
    one pass gives the maxima: the same values (a max is exact) except the sign of an all-zero
    channel's 0, which :func:`w4a8moe.quant.per_channel_scale`, the maxima's only use, maps
    to scale 1 either way.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a weight [N, K], got shape {tuple(weight.shape)}")
    w = weight.to(torch.float32)
    if not (callable(getattr(backend, "row_absmax", None)) and w.device.type == "cpu" and w.shape[1] > 0):
        return w, checked_channel_amax(w)
    amax, finite = backend.row_absmax(w)
    if not finite:
        raise ValueError("weight contains NaN or Inf")
    return w, amax


def _grid_search(products: IntProducts, x_q: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor,
                 amax: torch.Tensor, reference: torch.Tensor, grid: tuple[float, ...],
                 operands: dict[int, Int4Operand] | None = None, keep: set[int] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`search_weight_clip` on a checked fp32 weight and its ``amax``.

    ``operands`` caches the quantized weight per grid index across calls on the same weight
    (those in ``keep``, or all when ``keep`` is ``None``): it does not change with the input.
    """
    ref64 = reference.to(torch.float64)
    errors = []
    spares: list[Int4Operand] = []  # the last group's operands that nothing keeps: written over
    for start in range(0, len(grid), GRID_GROUP):
        group = range(start, min(start + GRID_GROUP, len(grid)))
        todo = [i for i in group if operands is None or operands.get(i) is None]
        made = dict(zip(todo, products.weight_operands(
            w, [per_channel_scale(amax, INT4_MAX, grid[i]) for i in todo], spares[:len(todo)])))
        spares = []
        for i in group:
            operand = made[i] if i in made else operands[i]
            if i in made:
                if operands is not None and (keep is None or i in keep):
                    operands[i] = operand
                else:
                    spares.append(operand)
            # ((y - ref) ** 2).sum(0) with y the fp32 scaled products: the squares in one pass.
            errors.append(products.squared_errors(x_q, x_scale, operand, ref64, torch.float32).sum(dim=0))
    err = torch.stack(errors)  # [G, N]
    best = torch.argmin(err, dim=0)  # first minimum: the larger clip on ties
    clip = torch.tensor(grid, dtype=torch.float32, device=err.device)[best]
    return clip, err[0], err.gather(0, best.unsqueeze(0)).squeeze(0)


def search_weight_clip(
    x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, reference: torch.Tensor,
    grid: tuple[float, ...] = DEFAULT_WEIGHT_CLIP_GRID, products: IntProducts | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-output-channel int4 clip factors minimising this projection's output error.

    ``x_q``/``x_scale``: the quantized input rows (int8 ``[M, K]``, fp32 ``[M, 1]``);
    ``weight`` fp32 ``[N, K]``; ``reference`` fp32 ``[M, N]`` the output to match. Each
    candidate clip quantizes the whole weight as :func:`quantize_int4_per_channel` does and
    multiplies as :func:`w4a8moe.quant.scaled_int_matmul` does (fp32 output; the exact int32
    products by ``products``' backend); output channels are independent, so each takes the
    grid value with the least squared error over the rows (ties go to the larger clip, grid
    order). Returns ``(clip [N], error with clip 1 [N], error with the chosen clip [N])``.
    """
    products = products or IntProducts()
    w, amax = _checked_amax(weight, products.backend)
    return _grid_search(products, x_q, x_scale, w, amax, reference, grid)


def _ste_round(z: torch.Tensor) -> torch.Tensor:
    """Round half-to-even forward, identity backward (straight-through estimator)."""
    return z + (torch.round(z) - z).detach()


def refine_alpha_ste(
    gate_up: torch.Tensor, w_down: torch.Tensor, reference: torch.Tensor, alpha0: float,
    steps: int = 40, lr: float = 0.02, form: str = "gram", backend: object | None = None,
) -> list[float]:
    """Candidate clips from gradient descent on ``alpha_e`` through a straight-through rounding.

    The differentiable surrogate mirrors :func:`swiglu_clip_quant` (clamp at
    ``alpha * max|h|``, step ``A/127``) with the rounding's gradient passed straight through,
    and multiplies by the dequantized down weight ``w_down`` ``[H, I]``; the loss is the mean
    squared output error over the mean squared reference. ``form`` computes its gradient
    with respect to the fake-quantized ``q`` ``[M, I]`` as ``2 (q W^T - ref) W`` (``direct``)
    or, from the second point on, ``2 (q G - ref W)`` with ``G = W^T W`` computed once
    (``gram``, :class:`GramGradient`): equal in exact arithmetic, rounded differently. Only
    the alphas it visits are returned; callers judge them with the exact runtime math.
    ``backend`` (a kernel backend, optional): where it offers the refinement's fused passes
    (the native CPU kernel, :func:`_native_ste`), the Gram form's steps after the first take
    their gradient from it instead of autograd, with the same bits.
    """
    if form not in REFINE_FORMS:
        raise ValueError(f"form must be one of {REFINE_FORMS}, got {form!r}")
    h = swiglu_fp32(gate_up)
    hmax = h.abs().amax(dim=-1, keepdim=True)
    ref = reference.to(torch.float32)
    scale = float((ref ** 2).mean()) or 1.0
    log_alpha = torch.tensor(float(torch.log(torch.tensor(alpha0))), requires_grad=True, device=h.device)
    opt = torch.optim.Adam([log_alpha], lr=lr)
    q_grad = GramGradient(w_down, ref, scale) if form == "gram" else None
    native = _native_ste(backend, h, hmax) if q_grad is not None else None
    with torch.enable_grad():  # callers may run under no_grad
        return _descend(log_alpha, opt, h, hmax, w_down, ref, scale, steps, q_grad, native)


class GramGradient:
    """``q -> d loss / d q`` of the refinement's loss ``mean((q W^T - ref)^2) / scale`` in the
    Gram form, ``2 (q G - ref W) / (M H scale)`` with ``G = W^T W`` ``[I, I]``.

    ``G`` costs about five direct-form steps at DeepSeek-V3 shapes, so it is built on the first
    call: :func:`_descend` takes its first step in the direct form (Adam's first step moves by
    the learning rate in the gradient's sign, whatever its last bits) and calls this only once
    the path leaves its start, which it often never does (alpha held at 1 by the clamp).
    """

    def __init__(self, w_down: torch.Tensor, ref: torch.Tensor, scale: float):
        self.w_down, self.ref = w_down, ref
        self.norm = 2.0 / (ref.numel() * scale)
        self._gram: torch.Tensor | None = None
        self._target: torch.Tensor | None = None

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        """The gradient at the fake-quantized input ``q`` ``[M, I]``."""
        if self._gram is None:
            # One matmul, not symmetric blocks: those round otherwise, and with these bits the
            # Gram form learns version 1's clips on every expert of the tests.
            self._gram = self.w_down.T @ self.w_down
            self._target = self.ref @ self.w_down  # [M, I]
        return (q @ self._gram).sub_(self._target).mul_(self.norm)


def _clip_bound(log_alpha: torch.Tensor, hmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exp(log_alpha), bound [M, 1])`` of the refinement's surrogate, under autograd or not."""
    e = log_alpha.exp()
    return e, e.clamp(ALPHA_MIN, 1.0) * hmax


def _clip_step(bound: torch.Tensor) -> torch.Tensor:
    """The quantization step ``[M, 1]`` of the clip ``bound``, as
    :func:`w4a8moe.quant.swiglu_clip_quant` has it (1 where the bound is 0)."""
    return torch.where(bound > 0, bound / INT8_MAX, torch.ones_like(bound))


def _sum_to_rows(t: torch.Tensor) -> torch.Tensor:
    """``at::sum_to(t, [M, 1])`` as autograd reduces a broadcast ``[M, 1]`` operand's grad."""
    return t if t.shape[1] == 1 else t.sum(dim=1, keepdim=True)


def _surrogate_q(log_alpha: torch.Tensor, h: torch.Tensor, hmax: torch.Tensor) -> torch.Tensor:
    """The refinement's straight-through fake quantization ``q`` ``[M, I]`` of ``h`` under
    ``alpha = clamp(exp(log_alpha))``, differentiable in ``log_alpha`` (autograd's path)."""
    # The order of these ops is part of the gradient's bits: it numbers autograd's nodes, and
    # the engine accumulates bound's three grads in that order (see _NativeSteGradient).
    _, bound = _clip_bound(log_alpha, hmax)
    clipped = torch.minimum(torch.maximum(h, -bound), bound)
    step = _clip_step(bound)
    return _ste_round(clipped / step) * step


class _NativeSteGradient:
    """``d loss / d log_alpha`` of one Gram-form step, the bits autograd gives, with the
    ``[M, I]`` elementwise work in two passes of the CPU kernel (its ``ste_clip_quant`` and
    ``ste_clip_quant_terms``) instead of about forty torch ops.

    The reductions and the ``[M, 1]`` and scalar steps stay torch's, those autograd's backward
    functions run (tools/autograd/derivatives.yaml, FunctionsManual.cpp), in the engine's
    order: it runs the ready node of the highest sequence number first, so ``bound``'s grad
    is ``(d_step + d_min) + d_neg`` (the ``bound / 127`` path, then ``minimum``, then ``-bound``;
    fp32 addition is not associative, so the order is part of the bits).
    """

    def __init__(self, kernel: object, h: torch.Tensor, hmax: torch.Tensor):
        self.kernel, self.h, self.hmax = kernel, h, hmax
        # Written again at every step: no [M, I] allocation per step.
        self._q = torch.empty_like(h)
        self._terms = tuple(torch.empty_like(h) for _ in range(4))

    def __call__(self, log_alpha: torch.Tensor, q_grad: GramGradient) -> torch.Tensor:
        """The gradient at ``log_alpha`` (0-dim), a fresh 0-dim fp32 tensor."""
        with torch.no_grad():
            e, bound = _clip_bound(log_alpha, self.hmax)
            step = _clip_step(bound)
            q = self.kernel.ste_clip_quant(self.h, bound, step, out=self._q)
            t_mul, t_div, t_min, t_max = self.kernel.ste_clip_quant_terms(self.h, q_grad(q), bound, step,
                                                                          out=self._terms)
            # MulBackward0 (q = a * step) + DivBackward0 (z = clipped / step): step's grad;
            # WhereBackward0, then DivBackward0 of bound / 127.
            d_step = torch.where(bound > 0, _sum_to_rows(t_mul) + _sum_to_rows(t_div), 0) / INT8_MAX
            # + MinimumBackward0's other, then NegBackward0 of MaximumBackward0's other.
            d_bound = (d_step + _sum_to_rows(t_min)) + _sum_to_rows(t_max).neg()
            # MulBackward0 (bound = alpha * hmax): sum_to a 0-dim alpha; ClampBackward1; ExpBackward0.
            d_alpha = (d_bound * self.hmax).sum(dim=(0, 1), keepdim=True).view([])
            inside = (e >= ALPHA_MIN).logical_and_(e <= 1.0)
            return torch.where(inside, d_alpha, torch.zeros_like(d_alpha)) * e


def _native_ste(backend: object | None, h: torch.Tensor, hmax: torch.Tensor) -> _NativeSteGradient | None:
    """The one dispatch of the refinement's Gram-form steps: the kernel path where ``backend``
    offers it and ``h`` suits it (fp32 on the CPU, finite: the kernel's max and min assume
    it), else ``None`` (autograd, the same bits)."""
    if backend is None or not callable(getattr(backend, "ste_clip_quant_terms", None)):
        return None
    if h.device.type != "cpu" or h.dtype != torch.float32 or h.dim() != 2 or h.numel() == 0:
        return None
    if not bool(torch.isfinite(hmax).all()):  # max |h| propagates NaN and Inf
        return None
    return _NativeSteGradient(backend, h.contiguous(), hmax)


def _descend(log_alpha: torch.Tensor, opt: torch.optim.Optimizer, h: torch.Tensor, hmax: torch.Tensor,
             w_down: torch.Tensor, ref: torch.Tensor, scale: float, steps: int,
             q_grad: GramGradient | None = None, native: _NativeSteGradient | None = None) -> list[float]:
    """The gradient steps of :func:`refine_alpha_ste`; returns the alpha after each step.
    With ``q_grad`` (the Gram form) every point after the first takes the loss's gradient at
    the fake-quantized input from it, through ``native`` where given (:func:`_native_ste`),
    else through autograd; otherwise the loss is differentiated through the output."""
    visited = []
    # The gradient is a function of log_alpha alone: where a step lands on a log_alpha seen
    # before (typically held at a bound by the clamp, e.g. alpha = 1), reuse it rather than
    # redo the matmuls; the bits are those a recomputation would give.
    seen: dict[float, torch.Tensor] = {}
    for _ in range(steps):
        key = float(log_alpha.detach())
        opt.zero_grad()
        if key in seen:
            log_alpha.grad = seen[key].clone()
        elif q_grad is not None and native is not None and seen:
            log_alpha.grad = native(log_alpha.detach(), q_grad)
            seen[key] = log_alpha.grad.clone()
        else:
            q = _surrogate_q(log_alpha, h, hmax)
            if q_grad is None or not seen:
                loss = ((q @ w_down.T - ref) ** 2).mean() / scale
                loss.backward()
            else:
                q.backward(q_grad(q.detach()))
            seen[key] = log_alpha.grad.detach().clone()
        opt.step()
        with torch.no_grad():
            log_alpha.clamp_(max=0.0, min=float(torch.log(torch.tensor(ALPHA_MIN))))
        visited.append(round(float(log_alpha.detach().exp()), 6))
    return visited


def _alpha_search(products: IntProducts, gate_up: torch.Tensor, down: Int4Operand, w_down: torch.Tensor,
                  reference: torch.Tensor, grid: tuple[float, ...], refine_steps: int, refine_lr: float,
                  refine_form: str = "gram") -> tuple[float, float, float]:
    """:func:`search_alpha` on a ready down operand; ``w_down`` fp32 ``[H, I]`` (only used
    for the refinement) holds the weight it stands for, as float."""
    reference64 = reference.to(torch.float64)
    # SwiGLU and its row maxima do not depend on alpha: once for all the points judged (the
    # bits of swiglu_clip_quant).
    h = swiglu_fp32(gate_up)
    row_max = h.abs().amax(dim=-1, keepdim=True)

    def err(a: float) -> float:
        h_q, h_scale = clip_quant_rows(h, a, row_max)
        return float(products.squared_errors(h_q, h_scale, down, reference64).sum())

    grid_errors = [err(a) for a in grid]
    best_i = min(range(len(grid)), key=lambda i: (grid_errors[i], i))
    best_alpha, best_err = float(grid[best_i]), grid_errors[best_i]
    grid_best = best_alpha
    if refine_steps > 0:
        path = refine_alpha_ste(gate_up, w_down, reference, best_alpha, refine_steps, refine_lr, refine_form,
                                products.backend)
        # Judge every REFINE_EVAL_EVERY-th point of the path and its end with the exact math.
        for a in sorted(set(path[REFINE_EVAL_EVERY - 1 :: REFINE_EVAL_EVERY] + path[-1:])):
            e = err(a)
            if e < best_err:
                best_alpha, best_err = a, e
    return best_alpha, best_err, grid_best


def search_alpha(
    gate_up: torch.Tensor, q_down: torch.Tensor, s_down: torch.Tensor, reference: torch.Tensor,
    grid: tuple[float, ...] = DEFAULT_ALPHA_GRID, refine_steps: int = 40, refine_lr: float = 0.02,
    products: IntProducts | None = None, refine_form: str = "gram",
) -> tuple[float, float, float]:
    """The activation clip ``alpha_e`` with the least exact output error on these rows.

    Grid search with the runtime math (:func:`quantized_down`), then straight-through
    gradient refinement from the grid's best; points of its path (every
    ``REFINE_EVAL_EVERY``-th and the last) replace it only if their exact error is lower
    (``refine_form``: see :func:`refine_alpha_ste`). Returns ``(alpha, its error, the grid's
    best alpha)``.
    """
    products = products or IntProducts()
    return _alpha_search(products, gate_up, products.values_operand(q_down, s_down),
                         dequantize_per_channel(q_down, s_down), reference, grid, refine_steps, refine_lr,
                         refine_form)


def _rtn_clips(w: ExpertWeights) -> dict[str, torch.Tensor]:
    return {p: torch.ones(getattr(w, p).shape[0], device=getattr(w, p).device) for p in ("gate", "up", "down")}


def _rtn_values(w: ExpertWeights, clips: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {p: quantize_int4_per_channel(getattr(w, p), clips[p]) for p in ("gate", "up", "down")}


def quantized_expert_output(x: torch.Tensor, w: ExpertWeights, clips: dict[str, torch.Tensor] | None = None,
                            alpha: float = 1.0, products: IntProducts | None = None) -> torch.Tensor:
    """The expert's W4A8 output (bf16 ``[M, H]``) with the given clips, by the runtime math."""
    products = products or IntProducts()
    x_q, x_scale = dynamic_quant_per_token(x)
    qs = {p: products.values_operand(*v) for p, v in _rtn_values(w, clips or _rtn_clips(w)).items()}
    return _down(products, _gate_up(products, x_q, x_scale, qs["gate"], qs["up"]), alpha, qs["down"])


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def learn_expert_clips(x: torch.Tensor, w: ExpertWeights, settings: ClipSearchSettings = ClipSearchSettings(),
                       products: IntProducts | None = None) -> ExpertClips:
    """Learn one expert's weight clips and activation clip from the rows ``x`` routed to it.

    ``x`` is the MoE block input of those tokens (``[M, H]``, the model dtype). See the module
    docstring for the procedure; with fewer than ``settings.min_expert_tokens`` rows every
    clip stays 1 (status ``"too_few_tokens"``). ``products`` runs the exact integer products
    (default: the fastest backend on the CPU); with a CUDA ``products`` the search runs on
    that device and the returned tensors are on the CPU. The clips do not depend on which
    backend multiplies (the products are exact), only on the float steps' device (see
    :mod:`w4a8moe.calibrate.products`).
    """
    products = products or IntProducts()
    device = products.device
    if x.device != device:
        x = x.to(device)
        w = ExpertWeights(w.gate.to(device), w.up.to(device), w.down.to(device))
    clips = _learn(x, w, settings, products)
    if device.type != "cpu":
        clips.weight_clip = {p: c.cpu() for p, c in clips.weight_clip.items()}
        if clips.quantized is not None:
            clips.quantized = {p: (q.cpu(), s.cpu()) for p, (q, s) in clips.quantized.items()}
    return clips


def _learn(x: torch.Tensor, w: ExpertWeights, settings: ClipSearchSettings, products: IntProducts) -> ExpertClips:
    m = x.shape[0]
    rtn = _rtn_clips(w)
    if m < settings.min_expert_tokens:
        return ExpertClips(rtn, 1.0, m, "too_few_tokens",
                           notes=[f"{m} routed tokens < min_expert_tokens={settings.min_expert_tokens}"])
    x_q, x_scale = dynamic_quant_per_token(x)
    # The gate/up searches match rows of the float projections: those rows of the product
    # over all tokens (a matmul's row does not depend on the other rows: the same bits).
    float_gate_up, reference = _reference_outputs(x, w)
    positions = torch.arange(m, device=x.device)
    fit = positions % HELDOUT_EVERY != HELDOUT_EVERY - 1
    held = ~fit
    # Each weight is checked, converted and reduced to its channel maxima once; its int4
    # operand under a clip vector is built once per distinct use (the per-grid ones of the
    # down projection are shared by both down searches, the clip-1 ones by the RTN output).
    weights, amax = {}, {}
    for p in ("gate", "up", "down"):
        weights[p], amax[p] = _checked_amax(getattr(w, p), products.backend)

    def operand(p: str, clip: torch.Tensor | float) -> Int4Operand:
        return products.weight_operand(weights[p], per_channel_scale(amax[p], INT4_MAX, clip))

    clips = dict(rtn)
    inter = w.gate.shape[0]
    projections = {"gate": float_gate_up[:, :inter], "up": float_gate_up[:, inter:]}
    at_1: dict[str, dict[int, Int4Operand]] = {p: {} for p in ("gate", "up")}
    if settings.learn_weight_clip:
        for proj in ("gate", "up"):
            clips[proj], _, _ = _grid_search(products, x_q[fit], x_scale[fit], weights[proj], amax[proj],
                                             projections[proj][fit], settings.weight_clip_grid,
                                             operands=at_1[proj], keep={0})
    ops = {p: operand(p, clips[p]) for p in ("gate", "up")}
    gate_up = _gate_up(products, x_q, x_scale, ops["gate"], ops["up"])
    down_grid: dict[int, Int4Operand] = {}

    def down_clip_for(alpha: float) -> torch.Tensor:
        if not settings.learn_weight_clip:
            return rtn["down"]
        h_q, h_scale = swiglu_clip_quant(gate_up[fit], alpha)
        clip, _, _ = _grid_search(products, h_q, h_scale, weights["down"], amax["down"], reference[fit],
                                  settings.weight_clip_grid, operands=down_grid)
        return clip

    def err_on(mask: torch.Tensor, down: Int4Operand, alpha: float) -> float:
        return _down_error(products, gate_up[mask], alpha, down, reference[mask].to(torch.float64))

    down_at_1 = down_clip_for(1.0)
    op_down_at_1 = operand("down", down_at_1)
    alpha, grid_best = 1.0, 1.0
    notes: list[str] = []
    down, op_down = down_at_1, op_down_at_1
    if settings.learn_alpha:
        w_down = fake_quantize_with_scale(weights["down"], op_down_at_1.scale, INT4_MAX) if settings.refine_steps > 0 else None
        cand_alpha, _, grid_best = _alpha_search(products, gate_up[fit], op_down_at_1, w_down, reference[fit],
                                                 settings.alpha_grid, settings.refine_steps, settings.refine_lr,
                                                 settings.refine_form)
        del w_down
        if cand_alpha != 1.0:
            cand_down = down_clip_for(cand_alpha)
            op_cand = operand("down", cand_down)
            base_held = err_on(held, op_down_at_1, 1.0)
            cand_held = err_on(held, op_cand, cand_alpha)
            if cand_held <= base_held:
                alpha, down, op_down = cand_alpha, cand_down, op_cand
            else:
                notes.append(f"alpha {cand_alpha:.4f} rejected: held-out error {cand_held:.4g} > {base_held:.4g}")
    clips["down"] = down

    learned = {"gate": ops["gate"], "up": ops["up"], "down": op_down}
    quantized = None
    if settings.gptq:
        values = _rtn_values(w, clips)
        candidate = _gptq_values(products, w, values, x_q, x_scale, fit, alpha)
        cand_ops = {p: products.values_operand(*candidate[p]) for p in candidate}

        def held_err(o: dict[str, Int4Operand]) -> float:
            gu = _gate_up(products, x_q[held], x_scale[held], o["gate"], o["up"])
            return squared_error(_down(products, gu, alpha, o["down"]), reference[held])

        base_held, gptq_held = held_err(learned), held_err(cand_ops)
        if gptq_held <= base_held:
            learned, quantized = cand_ops, candidate
        else:
            notes.append(f"GPTQ rejected: held-out error {gptq_held:.4g} > {base_held:.4g}")

    rtn_ops = {p: (at_1[p].get(0) or operand(p, rtn[p])) for p in ("gate", "up")}
    rtn_ops["down"] = down_grid.get(0) or operand("down", rtn["down"])
    del down_grid
    y_rtn = _down(products, _gate_up(products, x_q, x_scale, rtn_ops["gate"], rtn_ops["up"]), 1.0, rtn_ops["down"])
    gate_up_learned = gate_up if quantized is None else _gate_up(products, x_q, x_scale, learned["gate"],
                                                                  learned["up"])
    y_learned = _down(products, gate_up_learned, alpha, learned["down"])
    err_rtn, err_learned = squared_error(y_rtn, reference), squared_error(y_learned, reference)
    status = "learned"
    if err_learned > err_rtn:
        notes.append(f"learned clips worse than RTN on the calibration tokens ({err_learned:.4g} > {err_rtn:.4g})")
        clips, alpha, err_learned, y_learned, status, quantized = rtn, 1.0, err_rtn, y_rtn, "rtn_better", None
    return ExpertClips(
        weight_clip=clips, alpha=float(alpha), tokens=m, status=status,
        err_rtn=err_rtn, err_learned=err_learned, ref_energy=squared_error(reference, torch.zeros_like(reference)),
        heldout_err_rtn=squared_error(y_rtn[held], reference[held]),
        heldout_err_learned=squared_error(y_learned[held], reference[held]),
        heldout_ref_energy=squared_error(reference[held], torch.zeros_like(reference[held])),
        alpha_grid_best=grid_best, notes=notes, quantized=quantized,
    )


def _gptq_values(products: IntProducts, w: ExpertWeights, values: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 x_q: torch.Tensor, x_scale: torch.Tensor, fit: torch.Tensor, alpha: float,
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ (act-order) under the clip-search scales, on the inputs each projection really sees."""
    x_in = dequantize_per_channel(x_q[fit], x_scale[fit].reshape(-1))  # the int8 activations GMM1 reads
    out = {p: (gptq_int4(getattr(w, p), values[p][1], x_in), values[p][1]) for p in ("gate", "up")}
    gate_up = _gate_up(products, x_q[fit], x_scale[fit], products.values_operand(*out["gate"]),
                       products.values_operand(*out["up"]))
    h_q, h_scale = swiglu_clip_quant(gate_up, alpha)
    out["down"] = (gptq_int4(w.down, values["down"][1], dequantize_per_channel(h_q, h_scale.reshape(-1))),
                   values["down"][1])
    return out
