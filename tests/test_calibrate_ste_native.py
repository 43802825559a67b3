"""The clip search's float steps on the native kernel give torch's and autograd's bits.

:class:`w4a8moe.calibrate.clips._NativeSteGradient` replaces autograd's graph of the
straight-through clip-quant by two kernel passes and torch's own reductions, and
``row_absmax`` the channel maxima of ``_checked_amax``; the tests compare bits (``torch.equal``
on the int32 views), never values within a tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch

from w4a8moe.calibrate import ClipSearchSettings, learn_expert_clips
from w4a8moe.calibrate import clips as clips_mod
from w4a8moe.calibrate.clips import ALPHA_MIN
from w4a8moe.calibrate.products import IntProducts
from w4a8moe.kernels import cpu as cpu_mod
from w4a8moe.quant import swiglu_fp32
from tests.conftest import cpu_backend_or_skip

ISAS = ["native", "avx2"]  # the AVX-512 and the AVX2 loops (and their scalar row tails)




@pytest.fixture(params=ISAS)
def backend(request) -> cpu_mod.CpuBackend:
    return cpu_backend_or_skip(request.param)


@pytest.fixture
def threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(_bits(a), _bits(b))


LOG_ALPHAS = {
    "alpha 1": 0.0,
    "alpha min": math.log(ALPHA_MIN),
    "alpha 0.3": math.log(0.3),
    "alpha 0.7": math.log(0.7),
    "below the clamp": math.log(ALPHA_MIN) - 0.01,  # clamp's gradient is 0 outside
    "above the clamp": 0.05,
}


def _rows(m: int, i: int, log_alpha: float, seed: int) -> torch.Tensor:
    """h [m, i]: random rows of varied size with outlier columns, a row of zeros, and values
    exactly at +-bound (the ties of minimum and maximum) and at +-0."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(m, i, generator=g) * (torch.rand(m, 1, generator=g) * 3 + 1e-3)
    h[:, ::7] *= 10.0
    if m > 2:
        h[1] = 0.0  # hmax = 0: bound = 0, step = 1
    if i > 3:
        h[:, 3] = -0.0
    hmax = h.abs().amax(dim=-1, keepdim=True)
    bound = torch.tensor(log_alpha).exp().clamp(ALPHA_MIN, 1.0) * hmax  # <= hmax: hmax stays
    cols = torch.randint(0, i, (m, 2), generator=g)
    h.scatter_(1, cols[:, :1], bound)
    h.scatter_(1, cols[:, 1:], -bound)
    return h


SHAPES = [(1, 33), (17, 5), (3, 2047), (192, 2048), (7, 1), (2, 64)]


def _autograd_gradient(log_alpha: float, h: torch.Tensor, hmax: torch.Tensor, g: torch.Tensor):
    """(q, log_alpha.grad) of the production autograd path at ``g = d loss / d q``."""
    la = torch.tensor(log_alpha, requires_grad=True)
    with torch.enable_grad():
        q = clips_mod._surrogate_q(la, h, hmax)
        q.backward(g)
    return q.detach(), la.grad


@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_native_step_is_autograds_bits(backend, threads, shape, nthreads):
    torch.set_num_threads(nthreads)
    m, i = shape
    for seed, (name, log_alpha) in enumerate(LOG_ALPHAS.items()):
        h = _rows(m, i, log_alpha, seed)
        hmax = h.abs().amax(dim=-1, keepdim=True)
        gen = torch.Generator().manual_seed(100 + seed)
        g = torch.randn(m, i, generator=gen) * 1e-3
        g[:, ::5] = 0.0  # zero gradients meet the zero-valued terms
        q_ref, grad_ref = _autograd_gradient(log_alpha, h, hmax, g)
        native = clips_mod._native_ste(backend, h, hmax)
        assert native is not None
        seen_q = []
        grad = native(torch.tensor(log_alpha), lambda q: seen_q.append(q.clone()) or g)
        assert _same_bits(seen_q[0], q_ref), name
        assert grad.shape == () and grad.dtype == torch.float32
        assert _same_bits(grad, grad_ref), (name, float(grad), float(grad_ref))


def test_terms_match_the_torch_ops_they_stand_for(backend):
    """The four [M, I] terms, element for element, against the torch expressions autograd's
    backward functions evaluate (derivatives.yaml: mul, div, minimum, maximum)."""
    log_alpha = math.log(0.4)
    h = _rows(9, 2047, log_alpha, 7)
    hmax = h.abs().amax(dim=-1, keepdim=True)
    g = torch.randn(9, 2047, generator=torch.Generator().manual_seed(8))
    _, bound = clips_mod._clip_bound(torch.tensor(log_alpha), hmax)
    step = clips_mod._clip_step(bound)
    mx = torch.maximum(h, -bound)
    clipped = torch.minimum(mx, bound)
    z = clipped / step
    a = z + (torch.round(z) - z)
    grad_a = g * step
    grad_c = grad_a / step
    w_min = torch.where(mx == bound, grad_c / 2, grad_c)
    grad_mx = w_min.masked_fill(mx > bound, 0)
    expected = (g * a, -grad_a * ((clipped / step) / step), w_min.masked_fill(mx < bound, 0),
                torch.where(h == -bound, grad_mx / 2, grad_mx).masked_fill(h > -bound, 0))
    assert _same_bits(backend.ste_clip_quant(h, bound, step), a * step)
    for name, got, want in zip(("mul", "div", "min", "max"), backend.ste_clip_quant_terms(h, g, bound, step),
                               expected):
        assert _same_bits(got, want), name


class _RecordingAdam(torch.optim.Adam):
    """Adam that keeps each gradient it is handed."""

    def __init__(self, params, lr: float):
        super().__init__(params, lr=lr)
        self.grads: list[torch.Tensor] = []

    def step(self, closure=None):
        self.grads.append(self.param_groups[0]["params"][0].grad.detach().clone())
        return super().step(closure)


def _expert_rows(seed: int, m: int, i: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bf16 gate_up [m, 2i], fp32 w_down [hidden, i], reference [m, hidden]) with a few large
    channels of h that the down projection barely uses: alpha moves off its start."""
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(m, 2 * i, generator=g)
    gate_up[:, :: max(1, i // 4)] *= 8.0
    w_down = torch.randn(hidden, i, generator=g) / i ** 0.5
    w_down[:, :: max(1, i // 4)] *= 1e-3
    gate_up = gate_up.to(torch.bfloat16)
    reference = swiglu_fp32(gate_up) @ w_down.T
    return gate_up, w_down, reference


def _descend_grads(gate_up, w_down, reference, alpha0: float, backend, steps: int = 40) -> list[torch.Tensor]:
    """The gradients one Gram-form descent hands Adam, and the path, as refine_alpha_ste runs it."""
    h = swiglu_fp32(gate_up)
    hmax = h.abs().amax(dim=-1, keepdim=True)
    ref = reference.to(torch.float32)
    scale = float((ref ** 2).mean()) or 1.0
    log_alpha = torch.tensor(float(torch.log(torch.tensor(alpha0))), requires_grad=True)
    opt = _RecordingAdam([log_alpha], lr=0.02)
    q_grad = clips_mod.GramGradient(w_down, ref, scale)
    native = clips_mod._native_ste(backend, h, hmax) if backend is not None else None
    with torch.enable_grad():
        path = clips_mod._descend(log_alpha, opt, h, hmax, w_down, ref, scale, steps, q_grad, native)
    return opt.grads + [torch.tensor(path)]


@pytest.mark.parametrize("nthreads", [1, 2])
def test_whole_descents_are_autograds_bits(backend, threads, nthreads):
    torch.set_num_threads(nthreads)
    moved = 0
    for seed, (m, i, hidden) in enumerate([(48, 64, 96), (1, 33, 40), (23, 19, 37), (96, 256, 128)]):
        gate_up, w_down, reference = _expert_rows(seed, m, i, hidden)
        for alpha0 in (1.0, 0.5, 0.2, ALPHA_MIN):
            want = _descend_grads(gate_up, w_down, reference, alpha0, None)
            got = _descend_grads(gate_up, w_down, reference, alpha0, backend)
            assert len(got) == len(want)
            for step, (a, b) in enumerate(zip(got, want)):
                assert _same_bits(a, b), (seed, alpha0, step)
            moved += len(set(want[-1].tolist())) > 2
    assert moved >= 4  # the paths really travel (not held at a bound throughout)


def test_refine_alpha_ste_path_is_the_same_with_and_without_the_kernel(backend):
    gate_up, w_down, reference = _expert_rows(11, 64, 128, 96)
    for alpha0 in (1.0, 0.35):
        assert clips_mod.refine_alpha_ste(gate_up, w_down, reference, alpha0, backend=backend) == \
            clips_mod.refine_alpha_ste(gate_up, w_down, reference, alpha0)


class _WithoutSteKernel:
    """A backend that hides the clip search's float passes (the refinement's, the channel
    maxima): the search falls back to torch and autograd for those."""

    def __init__(self, backend: object):
        self._backend = backend

    def __getattr__(self, name: str):
        if name.startswith("ste_") or name == "row_absmax":
            raise AttributeError(name)
        return getattr(self._backend, name)


def test_learned_clips_are_the_same_with_and_without_the_kernel_refinement():
    from tests.test_calibrate import _assert_same_clips, _expert, _split_behaviour_expert, _tokens

    native = cpu_backend_or_skip("native")
    w, x = _split_behaviour_expert()
    x_same = x.clone()
    x_same[:, 1], x_same[:, 0] = x[0, 1], 8.0
    cases = [(_tokens(40 + s, 96), _expert(30 + s)) for s in range(3)] + [(x_same, w)]
    for x, w in cases:
        fused = learn_expert_clips(x, w, ClipSearchSettings(), IntProducts(native))
        plain = learn_expert_clips(x, w, ClipSearchSettings(), IntProducts(_WithoutSteKernel(native)))
        _assert_same_clips(fused, plain)


def test_dispatch():
    native = cpu_backend_or_skip("native")
    h = torch.randn(4, 8)
    hmax = h.abs().amax(dim=-1, keepdim=True)
    assert clips_mod._native_ste(native, h, hmax) is not None
    assert clips_mod._native_ste(None, h, hmax) is None
    assert clips_mod._native_ste(_WithoutSteKernel(native), h, hmax) is None
    from w4a8moe.kernels import get_backend

    assert clips_mod._native_ste(get_backend("reference"), h, hmax) is None
    assert clips_mod._native_ste(native, h.double(), hmax.double()) is None
    h_inf = h.clone()
    h_inf[2, 3] = float("inf")
    assert clips_mod._native_ste(native, h_inf, h_inf.abs().amax(dim=-1, keepdim=True)) is None
    h_nan = h.clone()
    h_nan[0, 0] = float("nan")
    assert clips_mod._native_ste(native, h_nan, h_nan.abs().amax(dim=-1, keepdim=True)) is None


def test_kernel_entry_points_check_their_arguments():
    native = cpu_backend_or_skip("native")
    h, bound, step = torch.randn(3, 8), torch.ones(3, 1), torch.ones(3, 1)
    with pytest.raises(ValueError, match="h must be fp32"):
        native.ste_clip_quant(h.double(), bound, step)
    with pytest.raises(ValueError, match="bound must be"):
        native.ste_clip_quant(h, torch.ones(2, 1), step)
    with pytest.raises(ValueError, match="g must be"):
        native.ste_clip_quant_terms(h, torch.randn(3, 7), bound, step)
    with pytest.raises(ValueError, match="out must"):
        native.ste_clip_quant(h, bound, step, out=torch.empty(3, 9))
    with pytest.raises(ValueError, match="4 tensors"):
        native.ste_clip_quant_terms(h, h, bound, step, out=(torch.empty(3, 8),))


# ---- the channel maxima of the clip search (_checked_amax) on the kernel ---------------------


def _torch_amax(w: torch.Tensor) -> torch.Tensor:
    low, high = torch.aminmax(w, dim=-1)
    return torch.maximum(-low, high)


@pytest.mark.parametrize("k", [1, 7, 16, 33, 2047, 7168])
def test_row_absmax_is_torchs_channel_maxima(backend, k):
    from tests.conftest import adversarial_rows
    from w4a8moe.quant import INT4_MAX, per_channel_scale

    w = adversarial_rows(40, k, seed=k)
    w[1] = -0.0
    w[2, ::2] = -0.0
    w[3] = torch.finfo(torch.float32).tiny / 4  # subnormal
    w[4, -1] = -torch.finfo(torch.float32).max
    w[5, 0] = -3.0  # a negative maximum magnitude in the first column
    amax, finite = backend.row_absmax(w)
    want = _torch_amax(w)
    assert finite
    assert torch.equal(amax, want)  # -0 == +0: the values
    nonzero = want != 0
    assert torch.equal(_bits(amax[nonzero]), _bits(want[nonzero]))  # and the bits, zeros aside
    assert _bits(amax[~nonzero]).eq(0).all()  # +0 for zero rows
    for clip in (1.0, 0.5):
        assert _same_bits(per_channel_scale(amax, INT4_MAX, clip), per_channel_scale(want, INT4_MAX, clip))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_row_absmax_flags_non_finite_weights(backend, bad):
    for k in (1, 33, 2048):
        for col in (0, k // 2, k - 1):
            w = torch.randn(5, k)
            w[3, col] = bad
            _, finite = backend.row_absmax(w)
            assert not finite, (k, col)
            with pytest.raises(ValueError, match="NaN or Inf"):
                clips_mod._checked_amax(w, backend)
            with pytest.raises(ValueError, match="NaN or Inf"):
                clips_mod._checked_amax(w)


def test_checked_amax_dispatch():
    native = cpu_backend_or_skip("native")
    w = torch.randn(64, 100).to(torch.bfloat16)
    w32, amax = clips_mod._checked_amax(w, native)
    assert w32.dtype == torch.float32 and torch.equal(amax, _torch_amax(w32))
    assert torch.equal(clips_mod._checked_amax(w, _WithoutSteKernel(native))[1], amax)
    with pytest.raises(ValueError, match="expected a weight"):
        clips_mod._checked_amax(torch.randn(3), native)
    with pytest.raises(ValueError, match="fp32"):
        native.row_absmax(torch.randn(3, 4).double())
