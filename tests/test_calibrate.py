"""Clip learning: the searches against brute force, never worse than round-to-nearest, and
lower held-out MoE-layer error than round-to-nearest on a model with realistic outliers."""

from __future__ import annotations

import itertools

import math

import pytest
import torch

from w4a8moe.calibrate import (
    ClipSearchSettings,
    ExpertWeights,
    expert_reference_output,
    learn_expert_clips,
    quantized_expert_output,
    search_alpha,
    search_weight_clip,
)
from w4a8moe.calibrate.clips import quantized_down, squared_error
from w4a8moe.convert import convert
from w4a8moe.convert.evaluate import moe_layer_errors
from w4a8moe.convert.synthetic import make_hf_checkpoint
from w4a8moe.data import load_text
from w4a8moe.models import tiny_config
from w4a8moe.quant import dynamic_quant_per_token, quantize_int4_per_channel, scaled_int_matmul


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _expert(seed: int, hidden: int = 64, inter: int = 32, outlier_cols: int = 3) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)

    def w(n: int, k: int) -> torch.Tensor:
        t = torch.randn(n, k, generator=g) / k ** 0.5
        t[:, torch.randperm(k, generator=g)[:outlier_cols]] *= 8.0
        return t

    return ExpertWeights(w(inter, hidden), w(inter, hidden), w(hidden, inter))


def _tokens(seed: int, m: int, hidden: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, hidden, generator=g)
    x[:, torch.randperm(hidden, generator=g)[:2]] *= 10.0  # massive-activation channels
    return x.to(torch.bfloat16)


def test_weight_clip_search_equals_brute_force_over_the_grid_product():
    """Per-channel argmin is the exact minimum of the total output error over all channel combinations."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 16, generator=g)
    w[:, 2] *= 6
    x = torch.randn(40, 16, generator=g)
    x_q, x_scale = dynamic_quant_per_token(x)
    ref = x @ w.T
    grid = (1.0, 0.9, 0.75, 0.6)
    clip, err_rtn, err_best = search_weight_clip(x_q, x_scale, w, ref, grid)

    def total(clips: tuple[float, ...]) -> float:
        q, s = quantize_int4_per_channel(w, torch.tensor(clips))
        return squared_error(scaled_int_matmul(x_q, x_scale, q, s, torch.float32), ref)

    brute = min(itertools.product(grid, repeat=3), key=total)
    assert total(tuple(clip.tolist())) == pytest.approx(total(brute), rel=1e-9)
    assert float(err_rtn.sum()) == pytest.approx(total((1.0, 1.0, 1.0)), rel=1e-9)
    assert float(err_best.sum()) == pytest.approx(total(tuple(clip.tolist())), rel=1e-9)
    assert bool((err_best <= err_rtn).all())


def test_alpha_search_against_a_fine_brute_force():
    w = _expert(1)
    x = _tokens(2, 300)
    x_q, x_scale = dynamic_quant_per_token(x)
    ref = expert_reference_output(x, w)
    qg, sg = quantize_int4_per_channel(w.gate)
    qu, su = quantize_int4_per_channel(w.up)
    qd, sd = quantize_int4_per_channel(w.down)
    gate_up = scaled_int_matmul(x_q, x_scale, torch.cat((qg, qu)), torch.cat((sg, su)))

    def err(a: float) -> float:
        return squared_error(quantized_down(gate_up, a, qd, sd), ref)

    grid = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
    alpha, alpha_err, grid_best = search_alpha(gate_up, qd, sd, ref, grid, refine_steps=40)
    assert alpha_err == pytest.approx(err(alpha), rel=1e-12)
    assert alpha_err <= min(err(a) for a in grid)  # refinement never loses the grid's best
    fine = min(err(0.3 + 0.7 * i / 400) for i in range(401))
    assert alpha_err <= fine * 1.02  # within 2% of a 400-point exhaustive search
    assert grid_best in grid


def test_learned_never_worse_than_rtn_and_better_on_outliers():
    improvements = []
    for seed in range(6):
        w = _expert(10 + seed)
        x = _tokens(20 + seed, 120)
        clips = learn_expert_clips(x, w)
        ref = expert_reference_output(x, w)
        # The figures are the calibration objective recomputed with the runtime math.
        rtn = squared_error(quantized_expert_output(x, w), ref)
        learned = squared_error(quantized_expert_output(x, w, clips.weight_clip, clips.alpha), ref)
        assert clips.err_rtn == pytest.approx(rtn, rel=1e-9)
        assert clips.err_learned == pytest.approx(learned, rel=1e-9)
        assert learned <= rtn
        improvements.append(rtn / learned)
        for proj, c in clips.weight_clip.items():
            assert bool(((c > 0) & (c <= 1)).all()), proj
        assert 0 < clips.alpha <= 1
    assert min(improvements) > 1.2  # outlier columns: clipping really helps


def _split_behaviour_expert() -> tuple[ExpertWeights, torch.Tensor]:
    """Fit tokens have a SwiGLU outlier in channel 0, which the down projection ignores
    (clipping it is free and sharpens the rest); held-out tokens (every 4th) have it in
    channel 1, which the down projection needs (clipping it is costly)."""
    g = torch.Generator().manual_seed(9)
    hidden, inter, m = 64, 32, 160
    w = ExpertWeights(torch.randn(inter, hidden, generator=g) * 0.05, torch.randn(inter, hidden, generator=g) * 0.05,
                      torch.randn(hidden, inter, generator=g) * 0.2)
    w.gate[0, 0] = w.up[0, 0] = 3.0
    w.gate[1, 1] = w.up[1, 1] = 3.0
    w.down[:, 0] = 0.0
    x = torch.randn(m, hidden, generator=g)
    held = torch.arange(m) % 4 == 3
    x[~held, 0] = 8.0
    x[held, 1] = 8.0
    return w, x.to(torch.bfloat16)


def test_alpha_accepted_only_if_held_out_tokens_do_not_get_worse():
    w, x = _split_behaviour_expert()
    settings = ClipSearchSettings(learn_weight_clip=False)
    clips = learn_expert_clips(x, w, settings)
    assert clips.alpha_grid_best < 0.5  # the fit tokens want a strong clip ...
    assert clips.alpha == 1.0  # ... which the held-out tokens refuse
    assert any("rejected" in n for n in clips.notes)
    # Where the held-out tokens behave like the fit ones, the same clip is accepted.
    x_same = x.clone()
    x_same[:, 1] = x[0, 1]
    x_same[:, 0] = 8.0
    accepted = learn_expert_clips(x_same, w, settings)
    assert accepted.alpha < 0.5 and accepted.status == "learned"
    assert accepted.err_learned < accepted.err_rtn


def test_too_few_tokens_fall_back_to_one_and_are_reported():
    w = _expert(5)
    clips = learn_expert_clips(_tokens(6, 7), w, ClipSearchSettings(min_expert_tokens=8))
    assert clips.status == "too_few_tokens" and clips.alpha == 1.0
    assert all(bool((c == 1).all()) for c in clips.weight_clip.values())
    assert "min_expert_tokens=8" in clips.notes[0]
    assert clips.summary()["rel_err_rtn"] is None


def test_grids_must_start_at_one():
    with pytest.raises(ValueError, match="start at 1.0"):
        ClipSearchSettings(alpha_grid=(0.9, 0.8))


def test_learned_clips_lower_held_out_moe_error_than_rtn(tmp_path):
    """Calibrate on the calib split, measure on the held-out split (never seen), layer by layer."""
    src = make_hf_checkpoint(tiny_config("deepseek_v3"), tmp_path / "src", seed=7, outliers=True)
    common = dict(calib_sequences=8, calib_seq_len=64, num_threads=1, progress=False)
    convert(src, tmp_path / "rtn", learn=False, progress=False)
    convert(src, tmp_path / "learned", **common)
    errors = moe_layer_errors(src, {"rtn": tmp_path / "rtn", "learned": tmp_path / "learned"},
                              load_text("heldout"), num_sequences=8, seq_len=64)
    assert sorted(errors["rtn"]) == [1, 2]
    for layer, rtn in errors["rtn"].items():
        assert errors["learned"][layer] < 0.9 * rtn, (layer, errors)


def test_gptq_reduces_the_fit_error_and_equals_rtn_without_correlations():
    from w4a8moe.calibrate.gptq import gptq_int4

    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 48, generator=g)
    q_rtn, s = quantize_int4_per_channel(w, 0.9)
    # Uncorrelated inputs (diagonal Hessian): no error to propagate, GPTQ is round-to-nearest.
    x_diag = torch.diag(torch.rand(48, generator=g) + 0.5)
    assert torch.equal(gptq_int4(w, s, x_diag), q_rtn)
    # Correlated inputs: lower output error on them, same scales, values still in [-7, 7].
    x = torch.randn(2000, 48, generator=g) @ torch.randn(48, 48, generator=g)
    q = gptq_int4(w, s, x)

    def err(values: torch.Tensor) -> float:
        return squared_error(x @ (values.to(torch.float32) * s[:, None]).T, x @ w.T)

    assert err(q) < 0.8 * err(q_rtn)
    assert int(q.abs().max()) <= 7 and q.dtype == torch.int8


def test_gptq_in_the_pipeline_validates(tmp_path):
    from w4a8moe import open_checkpoint

    src = make_hf_checkpoint(tiny_config("deepseek_v3"), tmp_path / "src", seed=11, outliers=True)
    report = convert(src, tmp_path / "dst", calib_sequences=8, calib_seq_len=64, num_threads=1, progress=False,
                     clip_settings=ClipSearchSettings(gptq=True))
    open_checkpoint(tmp_path / "dst")
    experts = [e for layer in (1, 2) for e in report["units"][f"layer_{layer}"]["moe"]["per_expert"]]
    assert all(e["rel_err_learned"] <= e["rel_err_rtn"] for e in experts)
    assert all(e["gptq"] or any("GPTQ rejected" in n for n in e["notes"]) or e["status"] != "learned"
               for e in experts)


# ---- the products' backend does not change a bit -------------------------------------------


def _native_or_skip():
    from w4a8moe.kernels import cpu as cpu_mod

    try:
        return cpu_mod.CpuBackend("native")
    except cpu_mod.KernelBuildError as exc:
        pytest.skip(f"the CPU kernel cannot be built here: {exc}")


def _assert_same_clips(a, b) -> None:
    assert (a.alpha, a.status, a.tokens, a.alpha_grid_best, a.notes) == (b.alpha, b.status, b.tokens,
                                                                         b.alpha_grid_best, b.notes)
    for f in ("err_rtn", "err_learned", "ref_energy", "heldout_err_rtn", "heldout_err_learned", "heldout_ref_energy"):
        assert getattr(a, f) == getattr(b, f), f
    for p in ("gate", "up", "down"):
        assert torch.equal(a.weight_clip[p].view(torch.int32), b.weight_clip[p].view(torch.int32)), p
    assert (a.quantized is None) == (b.quantized is None)
    for p in (a.quantized or {}):
        assert torch.equal(a.quantized[p][0], b.quantized[p][0]) and torch.equal(a.quantized[p][1], b.quantized[p][1])


def _adversarial_cases():
    """(name, x, weights, settings): outliers, zeros, tiny and odd shapes, alpha moving off 1."""
    cases = []
    for seed in range(3):
        cases.append((f"outliers{seed}", _tokens(40 + seed, 96), _expert(30 + seed), ClipSearchSettings()))
    w, x = _split_behaviour_expert()
    cases.append(("held-out refuses", x, w, ClipSearchSettings()))
    x_same = x.clone()
    x_same[:, 1], x_same[:, 0] = x[0, 1], 8.0
    cases.append(("alpha accepted", x_same, w, ClipSearchSettings()))
    odd = _expert(50, hidden=37, inter=19)
    x_odd = _tokens(51, 23, hidden=37)
    x_odd[3] = 0.0  # an all-zero token
    x_odd[5, 7] = 3e4  # one huge activation
    odd.down[:, 2] = 0.0  # an unused intermediate channel
    odd.gate[4] = 0.0  # an all-zero output channel
    cases.append(("odd sizes", x_odd, odd, ClipSearchSettings(gptq=True)))
    cases.append(("two tokens", _tokens(52, 2, hidden=37), odd, ClipSearchSettings(min_expert_tokens=2)))
    cases.append(("gptq", _tokens(53, 80), _expert(54), ClipSearchSettings(gptq=True)))
    cases.append(("alpha only", _tokens(55, 64), _expert(56), ClipSearchSettings(learn_weight_clip=False)))
    cases.append(("no refine", _tokens(57, 64), _expert(58), ClipSearchSettings(refine_steps=0)))
    return cases


@pytest.mark.parametrize("int_mm", [False, True], ids=["kernel", "int_mm"])
@pytest.mark.parametrize("case", _adversarial_cases(), ids=lambda c: c[0])
def test_native_products_give_the_float64_products_clips(case, int_mm):
    """The kernel's int8 GEMM (and its fused weight quantization), or torch._int_mm on the
    kernel's row-major quantization (the path on AMX CPUs), against the float64 matmul of the
    reference backend: the same clips, alpha, errors and GPTQ values, bit for bit."""
    from w4a8moe.calibrate.products import IntProducts
    from w4a8moe.kernels.reference import ReferenceBackend

    _, x, w, settings = case
    native = _native_or_skip()
    native.int_mm_products = int_mm
    slow = learn_expert_clips(x, w, settings, products=IntProducts(ReferenceBackend()))
    fast = learn_expert_clips(x, w, settings, products=IntProducts(native))
    _assert_same_clips(slow, fast)


def test_the_alpha_clip_moves_in_the_identity_cases():
    # Guards the test above: some of its cases must exercise the second down search, the
    # refinement and the held-out decision, not just alpha = 1 everywhere.
    alphas = {name: learn_expert_clips(x, w, s).alpha for name, x, w, s in _adversarial_cases()}
    assert alphas["alpha accepted"] < 0.5 and alphas["held-out refuses"] == 1.0
    assert sum(a != 1.0 for a in alphas.values()) >= 2


def test_public_searches_are_backend_independent():
    from w4a8moe.calibrate.products import IntProducts
    from w4a8moe.kernels.reference import ReferenceBackend

    fast, slow = IntProducts(_native_or_skip()), IntProducts(ReferenceBackend())
    w = _expert(60, hidden=48, inter=26)
    x = _tokens(61, 50, hidden=48)
    x_q, x_scale = dynamic_quant_per_token(x)
    ref = x.float() @ w.gate.T
    for a, b in zip(search_weight_clip(x_q, x_scale, w.gate, ref, products=fast),
                    search_weight_clip(x_q, x_scale, w.gate, ref, products=slow)):
        assert torch.equal(a, b)
    qd, sd = quantize_int4_per_channel(w.down)
    gate_up = scaled_int_matmul(x_q, x_scale, *quantize_int4_per_channel(torch.cat((w.gate, w.up))))
    reference = expert_reference_output(x, w)
    assert search_alpha(gate_up, qd, sd, reference, products=fast) == search_alpha(gate_up, qd, sd, reference,
                                                                                   products=slow)
    assert torch.equal(quantized_expert_output(x, w, products=fast), quantized_expert_output(x, w, products=slow))


def test_weight_with_nan_is_refused():
    w = _expert(62)
    w.up[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        learn_expert_clips(_tokens(63, 40), w)


def test_refinement_reusing_gradients_is_the_plain_descent():
    """:func:`refine_alpha_ste` reuses the gradient where log(alpha) repeats (held at a bound);
    a plain Adam loop that recomputes every step must visit the same alphas."""
    from w4a8moe.calibrate.clips import ALPHA_MIN, refine_alpha_ste
    from w4a8moe.quant import INT8_MAX, dequantize_per_channel, swiglu_fp32

    def plain(gate_up, w_down, reference, alpha0, steps, lr):
        h = swiglu_fp32(gate_up)
        hmax = h.abs().amax(dim=-1, keepdim=True)
        scale = float((reference ** 2).mean()) or 1.0
        log_alpha = torch.tensor(float(torch.log(torch.tensor(alpha0))), requires_grad=True)
        opt = torch.optim.Adam([log_alpha], lr=lr)
        out = []
        with torch.enable_grad():
            for _ in range(steps):
                bound = log_alpha.exp().clamp(ALPHA_MIN, 1.0) * hmax
                clipped = torch.minimum(torch.maximum(h, -bound), bound)
                step = torch.where(bound > 0, bound / INT8_MAX, torch.ones_like(bound))
                z = clipped / step
                y = ((z + (torch.round(z) - z).detach()) * step) @ w_down.T
                loss = ((y - reference) ** 2).mean() / scale
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    log_alpha.clamp_(max=0.0, min=float(torch.log(torch.tensor(ALPHA_MIN))))
                out.append(round(float(log_alpha.detach().exp()), 6))
        return out

    for w, x in ((_expert(64), _tokens(65, 80)), _split_behaviour_expert()):
        x_q, x_scale = dynamic_quant_per_token(x)
        gate_up = scaled_int_matmul(x_q, x_scale, *quantize_int4_per_channel(torch.cat((w.gate, w.up))))
        w_down = dequantize_per_channel(*quantize_int4_per_channel(w.down))
        reference = expert_reference_output(x, w)
        for alpha0 in (1.0, 0.5, ALPHA_MIN):
            assert refine_alpha_ste(gate_up, w_down, reference, alpha0, form="direct") == plain(
                gate_up, w_down, reference, alpha0, 40, 0.02)


def _ste_gradient(gate_up, w_down, reference, alpha: float) -> float:
    """d loss / d log(alpha) at ``alpha`` as the refinement computes it (its first step)."""
    from w4a8moe.calibrate.clips import _descend
    from w4a8moe.quant import swiglu_fp32

    h = swiglu_fp32(gate_up)
    hmax = h.abs().amax(dim=-1, keepdim=True)
    ref = reference.float()
    scale = float((ref ** 2).mean())
    log_alpha = torch.tensor(math.log(alpha), requires_grad=True)
    with torch.enable_grad():
        _descend(log_alpha, torch.optim.SGD([log_alpha], lr=0.0), h, hmax, w_down, ref, scale, 1)
    return float(log_alpha.grad)


def _fake_quant_float64(gate_up, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h, q, d q / d alpha)`` in float64, independently of the package: SwiGLU, the clip at
    ``alpha max|h|``, rounding on the grid ``A / 127`` with a straight-through derivative."""
    g, u = gate_up.double().chunk(2, dim=-1)
    h = g * torch.sigmoid(g) * u
    hmax = h.abs().amax(dim=-1, keepdim=True)
    bound = alpha * hmax
    step = bound / 127
    z = torch.clamp(h, -bound, bound) / step
    inside = (h.abs() < bound).double()
    # The step (A/127, linear in alpha) scales the rounded value; inside the bound z = h / step
    # falls as the step grows, clipped entries keep z = +-127.
    return h, torch.round(z) * step, (torch.round(z) - inside * z) * step / alpha


def _loss_q_gradient_float64(q, w_down, reference) -> torch.Tensor:
    w, ref = w_down.double(), reference.double()
    return 2 * ((q @ w.T - ref) @ w) / (ref.numel() * float((ref ** 2).mean()))


def _refine_cases():
    from w4a8moe.quant import dequantize_per_channel

    for w, x in ((_expert(64), _tokens(65, 80)), _split_behaviour_expert()):
        x_q, x_scale = dynamic_quant_per_token(x)
        gate_up = scaled_int_matmul(x_q, x_scale, *quantize_int4_per_channel(torch.cat((w.gate, w.up))))
        yield gate_up, dequantize_per_channel(*quantize_int4_per_channel(w.down)), expert_reference_output(x, w)


def test_direct_gradient_is_the_float64_gradient():
    for gate_up, w_down, reference in _refine_cases():
        for alpha in (0.9, 0.5, 0.23, 0.07):
            _, q, dq = _fake_quant_float64(gate_up, alpha)
            exact = float((_loss_q_gradient_float64(q, w_down, reference) * dq).sum() * alpha)  # d / d log(alpha)
            got = _ste_gradient(gate_up, w_down, reference, alpha)
            assert got == pytest.approx(exact, rel=2e-3, abs=1e-7 * (1 + abs(exact))), alpha


def test_gram_gradient_is_the_float64_gradient():
    from w4a8moe.calibrate.clips import GramGradient

    for gate_up, w_down, reference in _refine_cases():
        ref = reference.float()
        gram = GramGradient(w_down, ref, float((ref ** 2).mean()))
        for alpha in (0.9, 0.5, 0.23, 0.07):
            _, q, _ = _fake_quant_float64(gate_up, alpha)
            exact = _loss_q_gradient_float64(q, w_down, reference)
            got = gram(q.float()).double()
            assert float((got - exact).norm() / exact.norm()) < 1e-4, alpha


@pytest.mark.parametrize("case", _adversarial_cases(), ids=lambda c: c[0])
def test_gram_form_learns_the_direct_forms_clips(case):
    """The issue's bar for the cheaper refinement: on these experts (outliers, zeros, odd
    sizes, alpha moving) the Gram form learns converter version 1's clips bit for bit; the
    rounded alphas of its path are the same although its gradients differ in the last bits."""
    from dataclasses import replace

    _, x, w, settings = case
    _assert_same_clips(learn_expert_clips(x, w, replace(settings, refine_form="direct")),
                       learn_expert_clips(x, w, settings))


def test_refinement_settings_are_checked():
    with pytest.raises(ValueError, match="refine_form"):
        ClipSearchSettings(refine_form="adam")
    with pytest.raises(ValueError, match="refine_steps"):
        ClipSearchSettings(refine_steps=-1)


def test_products_backend_by_device():
    from w4a8moe.calibrate.products import IntProducts
    from w4a8moe.kernels.base import int_matmul_backend

    assert hasattr(int_matmul_backend("cpu"), "int_matmul")
    assert IntProducts().device == torch.device("cpu")
    with pytest.raises(ValueError, match="no exact integer matmul"):
        int_matmul_backend("meta")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            int_matmul_backend("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_products_are_exact_and_the_clips_match_where_the_math_is_exact():
    from w4a8moe.calibrate.products import IntProducts
    from w4a8moe.quant import int8_matmul_int32

    cuda = IntProducts(device="cuda")
    g = torch.Generator().manual_seed(70)
    for m, n, k in ((1, 1, 1), (5, 33, 7), (40, 130, 1031), (300, 64, 256)):
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        assert torch.equal(cuda.backend.int_matmul(a.cuda(), b.cuda()).cpu(), int8_matmul_int32(a, b))
    # The weight clip search alone: exact integer products, elementwise fp32/fp64 steps that
    # CUDA rounds as the CPU does, and per-channel sums over the rows, which CUDA adds in
    # another order (an ulp of an error; only a near-exact tie between two clips could flip).
    # The reference (an fp32 matmul, which would differ more) is the CPU's for both.
    w = _expert(71)
    x = _tokens(72, 90)
    x_q, x_scale = dynamic_quant_per_token(x)
    ref = x.float() @ w.gate.T
    cpu_clip = search_weight_clip(x_q, x_scale, w.gate, ref)[0]
    cuda_clip = search_weight_clip(x_q.cuda(), x_scale.cuda(), w.gate.cuda(), ref.cuda(), products=cuda)[0]
    assert torch.equal(cpu_clip, cuda_clip.cpu())
    clips = learn_expert_clips(x, w, products=cuda)  # the whole search runs there and returns CPU tensors
    assert all(c.device.type == "cpu" for c in clips.weight_clip.values()) and 0 < clips.alpha <= 1


def test_fake_quantized_down_is_dequantize_of_quantize():
    from w4a8moe.quant import (INT4_MAX, dequantize_per_channel, fake_quantize_with_scale, per_channel_scale,
                               quantize_with_scale)

    w = _expert(71, hidden=48, inter=26).down
    w[3] = 0.0  # an all-zero channel (scale 1)
    w[5, 7] = 1e4  # an outlier
    for clip in (1.0, 0.55, 0.1):
        scale = per_channel_scale(w.abs().amax(dim=-1), INT4_MAX, clip)
        expected = dequantize_per_channel(quantize_with_scale(w, scale, INT4_MAX), scale)
        assert torch.equal(fake_quantize_with_scale(w, scale, INT4_MAX).view(torch.int32),
                           expected.view(torch.int32))
        # Both now share one rounding; against version 1's expression, written out here:
        v1_levels = torch.clamp(torch.round(w / scale.unsqueeze(-1)), -INT4_MAX, INT4_MAX).to(torch.int8)
        assert torch.equal(quantize_with_scale(w, scale, INT4_MAX), v1_levels)


def test_rows_of_a_float_product_do_not_depend_on_the_other_rows():
    # The clip search takes the gate/up references as the fit rows of the product over all
    # tokens; version 1 multiplied the fit rows alone. The same bits, on this build:
    g = torch.Generator().manual_seed(72)
    for m, k, n in ((96, 64, 32), (23, 37, 19), (2, 37, 19), (256, 1792, 512)):
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
        fit = torch.arange(m) % 4 != 3
        assert torch.equal((x @ w.T)[fit], x[fit] @ w.T)
