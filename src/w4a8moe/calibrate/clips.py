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
   estimator of the rounding (kept only where the exact error improves);
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
from w4a8moe.quant import (
    INT8_MAX,
    dequantize_per_channel,
    dynamic_quant_per_token,
    quantize_int4_per_channel,
    scaled_int_matmul,
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

    def __post_init__(self) -> None:
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
    xf = x.to(torch.float32)
    gate_up = torch.cat((xf @ w.gate.T, xf @ w.up.T), dim=-1)
    return swiglu_fp32(gate_up) @ w.down.T


def quantized_gate_up(x_q: torch.Tensor, x_scale: torch.Tensor, q_gate: torch.Tensor, s_gate: torch.Tensor,
                      q_up: torch.Tensor, s_up: torch.Tensor) -> torch.Tensor:
    """GMM1 as the runtime runs it: int8 input x int4 gate|up, bf16 output ``[M, 2I]``."""
    return scaled_int_matmul(x_q, x_scale, torch.cat((q_gate, q_up)), torch.cat((s_gate, s_up)))


def quantized_down(gate_up: torch.Tensor, alpha: float, q_down: torch.Tensor, s_down: torch.Tensor,
                   out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """SwiGLU-clip-quant then GMM2, as the runtime runs it (bf16 output by default)."""
    h_q, h_scale = swiglu_clip_quant(gate_up, alpha)
    return scaled_int_matmul(h_q, h_scale, q_down, s_down, out_dtype)


def squared_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    """``sum (y - reference)^2`` in float64."""
    return float(((y.to(torch.float64) - reference.to(torch.float64)) ** 2).sum())


def search_weight_clip(
    x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, reference: torch.Tensor,
    grid: tuple[float, ...] = DEFAULT_WEIGHT_CLIP_GRID,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-output-channel int4 clip factors minimising this projection's output error.

    ``x_q``/``x_scale``: the quantized input rows (int8 ``[M, K]``, fp32 ``[M, 1]``);
    ``weight`` fp32 ``[N, K]``; ``reference`` fp32 ``[M, N]`` the output to match. Each
    candidate clip quantizes the whole weight with :func:`quantize_int4_per_channel` and runs
    :func:`scaled_int_matmul`; output channels are independent, so each takes the grid value
    with the least squared error over the rows (ties go to the larger clip, grid order).
    Returns ``(clip [N], error with clip 1 [N], error with the chosen clip [N])``.
    """
    errors = []
    for g in grid:
        q, s = quantize_int4_per_channel(weight, clip=g)
        y = scaled_int_matmul(x_q, x_scale, q, s, out_dtype=torch.float32)
        errors.append(((y.to(torch.float64) - reference.to(torch.float64)) ** 2).sum(dim=0))
    err = torch.stack(errors)  # [G, N]
    best = torch.argmin(err, dim=0)  # first minimum: the larger clip on ties
    clip = torch.tensor(grid, dtype=torch.float32)[best]
    return clip, err[0], err.gather(0, best.unsqueeze(0)).squeeze(0)


def _ste_round(z: torch.Tensor) -> torch.Tensor:
    """Round half-to-even forward, identity backward (straight-through estimator)."""
    return z + (torch.round(z) - z).detach()


def refine_alpha_ste(
    gate_up: torch.Tensor, w_down: torch.Tensor, reference: torch.Tensor, alpha0: float,
    steps: int = 40, lr: float = 0.02,
) -> list[float]:
    """Candidate clips from gradient descent on ``alpha_e`` through a straight-through rounding.

    The differentiable surrogate mirrors :func:`swiglu_clip_quant` (clamp at
    ``alpha * max|h|``, step ``A/127``) with the rounding's gradient passed straight through,
    and multiplies by the dequantized down weight ``w_down`` ``[H, I]``. Only the alphas it
    visits are returned; callers judge them with the exact runtime math.
    """
    h = swiglu_fp32(gate_up)
    hmax = h.abs().amax(dim=-1, keepdim=True)
    ref = reference.to(torch.float32)
    scale = float((ref ** 2).mean()) or 1.0
    log_alpha = torch.tensor(float(torch.log(torch.tensor(alpha0))), requires_grad=True)
    opt = torch.optim.Adam([log_alpha], lr=lr)
    with torch.enable_grad():  # callers may run under no_grad
        return _descend(log_alpha, opt, h, hmax, w_down, ref, scale, steps)


def _descend(log_alpha: torch.Tensor, opt: torch.optim.Optimizer, h: torch.Tensor, hmax: torch.Tensor,
             w_down: torch.Tensor, ref: torch.Tensor, scale: float, steps: int) -> list[float]:
    """The gradient steps of :func:`refine_alpha_ste`; returns the alpha after each step."""
    visited = []
    for _ in range(steps):
        alpha = log_alpha.exp().clamp(ALPHA_MIN, 1.0)
        bound = alpha * hmax
        clipped = torch.minimum(torch.maximum(h, -bound), bound)
        step = torch.where(bound > 0, bound / INT8_MAX, torch.ones_like(bound))
        y = (_ste_round(clipped / step) * step) @ w_down.T
        loss = ((y - ref) ** 2).mean() / scale
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            log_alpha.clamp_(max=0.0, min=float(torch.log(torch.tensor(ALPHA_MIN))))
        visited.append(round(float(log_alpha.detach().exp()), 6))
    return visited


def search_alpha(
    gate_up: torch.Tensor, q_down: torch.Tensor, s_down: torch.Tensor, reference: torch.Tensor,
    grid: tuple[float, ...] = DEFAULT_ALPHA_GRID, refine_steps: int = 40, refine_lr: float = 0.02,
) -> tuple[float, float, float]:
    """The activation clip ``alpha_e`` with the least exact output error on these rows.

    Grid search with the runtime math (:func:`quantized_down`), then straight-through
    gradient refinement from the grid's best; points of its path (every
    ``REFINE_EVAL_EVERY``-th and the last) replace it only if their exact error is lower. Returns ``(alpha, its error, the grid's best alpha)``.
    """
    def err(a: float) -> float:
        return squared_error(quantized_down(gate_up, a, q_down, s_down), reference)

    grid_errors = [err(a) for a in grid]
    best_i = min(range(len(grid)), key=lambda i: (grid_errors[i], i))
    best_alpha, best_err = float(grid[best_i]), grid_errors[best_i]
    grid_best = best_alpha
    if refine_steps > 0:
        w_down = dequantize_per_channel(q_down, s_down)
        path = refine_alpha_ste(gate_up, w_down, reference, best_alpha, refine_steps, refine_lr)
        # Judge every REFINE_EVAL_EVERY-th point of the path and its end with the exact math.
        for a in sorted(set(path[REFINE_EVAL_EVERY - 1 :: REFINE_EVAL_EVERY] + path[-1:])):
            e = err(a)
            if e < best_err:
                best_alpha, best_err = a, e
    return best_alpha, best_err, grid_best


def _rtn_clips(w: ExpertWeights) -> dict[str, torch.Tensor]:
    return {p: torch.ones(getattr(w, p).shape[0]) for p in ("gate", "up", "down")}


def _rtn_values(w: ExpertWeights, clips: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {p: quantize_int4_per_channel(getattr(w, p), clips[p]) for p in ("gate", "up", "down")}


def _output_of(x_q, x_scale, qs: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float) -> torch.Tensor:
    gate_up = quantized_gate_up(x_q, x_scale, *qs["gate"], *qs["up"])
    return quantized_down(gate_up, alpha, *qs["down"])


def _expert_output(x_q, x_scale, w: ExpertWeights, clips: dict[str, torch.Tensor], alpha: float) -> torch.Tensor:
    return _output_of(x_q, x_scale, _rtn_values(w, clips), alpha)


def quantized_expert_output(x: torch.Tensor, w: ExpertWeights, clips: dict[str, torch.Tensor] | None = None,
                            alpha: float = 1.0) -> torch.Tensor:
    """The expert's W4A8 output (bf16 ``[M, H]``) with the given clips, by the runtime math."""
    x_q, x_scale = dynamic_quant_per_token(x)
    return _expert_output(x_q, x_scale, w, clips or _rtn_clips(w), alpha)


def learn_expert_clips(x: torch.Tensor, w: ExpertWeights, settings: ClipSearchSettings = ClipSearchSettings()
                       ) -> ExpertClips:
    """Learn one expert's weight clips and activation clip from the rows ``x`` routed to it.

    ``x`` is the MoE block input of those tokens (``[M, H]``, the model dtype). See the module
    docstring for the procedure; with fewer than ``settings.min_expert_tokens`` rows every
    clip stays 1 (status ``"too_few_tokens"``).
    """
    m = x.shape[0]
    rtn = _rtn_clips(w)
    if m < settings.min_expert_tokens:
        return ExpertClips(rtn, 1.0, m, "too_few_tokens",
                           notes=[f"{m} routed tokens < min_expert_tokens={settings.min_expert_tokens}"])
    x_q, x_scale = dynamic_quant_per_token(x)
    reference = expert_reference_output(x, w)
    positions = torch.arange(m)
    fit = positions % HELDOUT_EVERY != HELDOUT_EVERY - 1
    held = ~fit
    xf = x.to(torch.float32)

    clips = dict(rtn)
    if settings.learn_weight_clip:
        for proj in ("gate", "up"):
            weight = getattr(w, proj)
            clips[proj], _, _ = search_weight_clip(
                x_q[fit], x_scale[fit], weight, xf[fit] @ weight.T, settings.weight_clip_grid
            )
    qg, sg = quantize_int4_per_channel(w.gate, clips["gate"])
    qu, su = quantize_int4_per_channel(w.up, clips["up"])
    gate_up = quantized_gate_up(x_q, x_scale, qg, sg, qu, su)

    def down_clip_for(alpha: float) -> torch.Tensor:
        if not settings.learn_weight_clip:
            return rtn["down"]
        h_q, h_scale = swiglu_clip_quant(gate_up[fit], alpha)
        clip, _, _ = search_weight_clip(h_q, h_scale, w.down, reference[fit], settings.weight_clip_grid)
        return clip

    def err_on(mask: torch.Tensor, down_clip: torch.Tensor, alpha: float) -> float:
        qd, sd = quantize_int4_per_channel(w.down, down_clip)
        return squared_error(quantized_down(gate_up[mask], alpha, qd, sd), reference[mask])

    down_at_1 = down_clip_for(1.0)
    alpha, grid_best = 1.0, 1.0
    notes: list[str] = []
    down = down_at_1
    if settings.learn_alpha:
        qd1, sd1 = quantize_int4_per_channel(w.down, down_at_1)
        cand_alpha, _, grid_best = search_alpha(gate_up[fit], qd1, sd1, reference[fit], settings.alpha_grid,
                                                settings.refine_steps, settings.refine_lr)
        if cand_alpha != 1.0:
            cand_down = down_clip_for(cand_alpha)
            base_held = err_on(held, down_at_1, 1.0)
            cand_held = err_on(held, cand_down, cand_alpha)
            if cand_held <= base_held:
                alpha, down = cand_alpha, cand_down
            else:
                notes.append(f"alpha {cand_alpha:.4f} rejected: held-out error {cand_held:.4g} > {base_held:.4g}")
    clips["down"] = down

    values = _rtn_values(w, clips)
    quantized = None
    if settings.gptq:
        candidate = _gptq_values(w, values, x_q, x_scale, fit, alpha)
        base_held = squared_error(_output_of(x_q[held], x_scale[held], values, alpha), reference[held])
        gptq_held = squared_error(_output_of(x_q[held], x_scale[held], candidate, alpha), reference[held])
        if gptq_held <= base_held:
            values = quantized = candidate
        else:
            notes.append(f"GPTQ rejected: held-out error {gptq_held:.4g} > {base_held:.4g}")

    y_rtn = _expert_output(x_q, x_scale, w, rtn, 1.0)
    y_learned = _output_of(x_q, x_scale, values, alpha)
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


def _gptq_values(w: ExpertWeights, values: dict[str, tuple[torch.Tensor, torch.Tensor]], x_q: torch.Tensor,
                 x_scale: torch.Tensor, fit: torch.Tensor, alpha: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ (act-order) under the clip-search scales, on the inputs each projection really sees."""
    x_in = dequantize_per_channel(x_q[fit], x_scale[fit].reshape(-1))  # the int8 activations GMM1 reads
    out = {p: (gptq_int4(getattr(w, p), values[p][1], x_in), values[p][1]) for p in ("gate", "up")}
    h_q, h_scale = swiglu_clip_quant(quantized_gate_up(x_q[fit], x_scale[fit], *out["gate"], *out["up"]), alpha)
    out["down"] = (gptq_int4(w.down, values["down"][1], dequantize_per_channel(h_q, h_scale.reshape(-1))),
                   values["down"][1])
    return out
