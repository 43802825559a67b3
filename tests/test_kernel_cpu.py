"""The native CPU backend against the reference backend and the independent numpy SPEC code.

Equality is bitwise throughout: the kernel accumulates exactly in int32, forms the scales in
the reference's fp32 order, rounds to bf16 as torch does and takes ``silu`` from tables built
by ``swiglu_fp32`` itself (including which elements torch computes with its scalar code), so
any difference at all is a bug. The comparison with the numpy SPEC code, whose ``exp`` is
not torch's, uses a tolerance justified where it is applied.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from tests.conftest import adversarial_rows, cpu_backend_or_skip
from tests.reference import spec_numpy as ref
from w4a8moe.formats import MoEModelConfig, quantize_moe_layer
from w4a8moe.kernels import cpu as cpu_mod
from w4a8moe.kernels.base import PackedExpertWeights, available_backends, combine_rows, get_backend
from w4a8moe.kernels.reference import ReferenceBackend
from w4a8moe.models.synthetic import random_float_moe_layer, tiny_config
from w4a8moe.moe import W4A8MoE
from w4a8moe.quant import (
    dynamic_quant_per_token,
    int8_matmul_int32,
    pack_int4_pairs,
    scaled_int_matmul,
    silu_and_mul,
    swiglu_clip_quant,
    swiglu_fp32,
    unpack_int4_pairs,
    w8a8_linear,
)




def test_kernel_builds_where_a_compiler_and_avx2_exist():
    # The other tests skip where the kernel cannot be built; this one keeps a broken C source
    # from passing as "cannot be built here" on any machine that should build it.
    if cpu_mod._compiler() is None or " avx2 " not in f" {cpu_mod._cpu_flags()} ":
        pytest.skip("no C compiler or no AVX2 on this machine")
    assert cpu_mod.load_kernel("native").isa in ("avx2", "avx-vnni", "avx512-vnni")


ISAS = ["native", "avx2", "avx2-maddubs"]


@pytest.fixture(params=ISAS)
def backend(request) -> cpu_mod.CpuBackend:
    return cpu_backend_or_skip(request.param)


@pytest.fixture
def native() -> cpu_mod.CpuBackend:
    return cpu_backend_or_skip("native")


def _round_up(v: int, to: int) -> int:
    return (v + to - 1) // to * to


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _assert_bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    # Bitwise, except that any NaN equals any NaN: a row of ~1e30 activations overflows
    # silu(g) * u to inf in both backends, and torch's vector and scalar bf16 conversions
    # themselves write different NaN payloads.
    assert a.shape == b.shape and a.dtype == b.dtype
    both_nan = torch.isnan(a.float()) & torch.isnan(b.float())
    diff = ((_bits(a) != _bits(b)) & ~both_nan).sum().item()
    assert diff == 0, f"{diff} of {a.numel()} elements differ"


# ---- one matrix ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,k,m",
    [(64, 128, 8), (34, 37, 9), (2, 1, 1), (96, 7, 17), (32, 4, 0), (4096 // 16, 515, 3), (30, 64, 33)],
)
def test_gemm_int32_is_exact(backend, n, k, m):
    g = torch.Generator().manual_seed(n * 1000 + k + m)
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)  # -8 included
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    acc = backend.gemm(backend.relayout(pack_int4_pairs(q)), n, k, x)
    assert acc.dtype == torch.int32
    assert torch.equal(acc, int8_matmul_int32(x, q))
    assert np.array_equal(acc.numpy(), x.numpy().astype(np.int64) @ q.numpy().astype(np.int64).T)


def test_gemm_int32_extremes(backend):
    # The largest magnitudes both operands can hold: all products +1024 or -1024.
    n, k = 64, 1031
    for wv, xv in ((-8, -128), (-8, 127), (7, -128), (7, 127)):
        q = torch.full((n, k), wv, dtype=torch.int8)
        x = torch.full((5, k), xv, dtype=torch.int8)
        acc = backend.gemm(backend.relayout(pack_int4_pairs(q)), n, k, x)
        assert bool((acc == wv * xv * k).all())


def test_gemm_scaled_bf16_matches_scaled_int_matmul(backend):
    g = torch.Generator().manual_seed(7)
    n, k, m = 70, 301, 11
    q = torch.randint(-7, 8, (n, k), dtype=torch.int8, generator=g)
    x = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    x_scale = torch.rand(m, 1, generator=g) * torch.logspace(-6, 3, m).unsqueeze(1)
    w_scale = torch.rand(n, generator=g) * 0.05
    y = backend.gemm(backend.relayout(pack_int4_pairs(q)), n, k, x, x_scale, w_scale)
    _assert_bitwise(y, scaled_int_matmul(x, x_scale, q, w_scale))
    assert np.array_equal(y.float().numpy(), ref.int_matmul(x.numpy(), x_scale.numpy(), q.numpy(), w_scale.numpy()))


# ---- int8 weights (W8A8 Linears) as two int4 planes ----------------------------------------------


@pytest.mark.parametrize("n,k,m", [(64, 256, 1), (33, 70, 13), (5, 7, 3), (48, 130, 0), (2, 4, 40)])
def test_int8_gemm_is_exact(backend, n, k, m):
    g = torch.Generator().manual_seed(n * k + m)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    prepared = backend.prepare_int8_linear(w, torch.ones(n))
    assert prepared.layout.numel() == 2 * _round_up(n, 32) * _round_up(k, 4) // 2  # 8 bits per weight
    acc = backend.gemm_int8(prepared.layout, n, k, x)
    assert acc.dtype == torch.int32 and acc.shape == (m, n)
    assert np.array_equal(acc.numpy(), x.numpy().astype(np.int64) @ w.numpy().astype(np.int64).T)


def test_int8_gemm_extremes(backend):
    # Saturation-prone operands: plain AVX2's u8 x s8 pair sums would clip at 255 * 127 * 2.
    for wv, xv in ((-128, -128), (127, 127), (-128, 127), (127, -128)):
        w = torch.full((40, 1031), wv, dtype=torch.int8)
        x = torch.full((3, 1031), xv, dtype=torch.int8)
        acc = backend.gemm_int8(backend.prepare_int8_linear(w, torch.ones(40)).layout, 40, 1031, x)
        assert bool((acc == wv * xv * 1031).all())


@pytest.mark.parametrize("n,k,m", [(96, 200, 9), (33, 70, 1), (7, 5, 0)])
def test_int8_linear_is_scaled_int_matmul(backend, n, k, m):
    g = torch.Generator().manual_seed(n + k + m)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    s = torch.rand(n, generator=g) * torch.logspace(-5, 1, n)
    x_q, x_scale = dynamic_quant_per_token(adversarial_rows(m, k, seed=m) if m else torch.zeros(0, k))
    y = backend.int8_linear(backend.prepare_int8_linear(w, s), x_q, x_scale)
    _assert_bitwise(y, scaled_int_matmul(x_q, x_scale, w, s))
    _assert_bitwise(y, ReferenceBackend().int8_linear(ReferenceBackend().prepare_int8_linear(w, s), x_q, x_scale))


def test_int8_linear_overflow_like_the_reference(native):
    # K where int32 could overflow goes the reference's way: exact below 2**31, OverflowError above.
    w = torch.full((2, 140_000), -128, dtype=torch.int8)
    ok = torch.zeros((1, 140_000), dtype=torch.int8)
    ok[0, :100_000] = -128
    prepared = native.prepare_int8_linear(w, torch.ones(2))
    y = native.int8_linear(prepared, ok, torch.ones(1, 1))
    assert bool((y.float() == float(torch.tensor(128.0 * 128 * 100_000).to(torch.bfloat16))).all())
    with pytest.raises(OverflowError):
        native.int8_linear(prepared, torch.full((1, 140_000), -128, dtype=torch.int8), torch.ones(1, 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,k", [(1, 7), (13, 300), (64, 1031), (0, 16), (3, 16)])
def test_quantize_per_token_is_torch_bit_for_bit(backend, dtype, m, k):
    x = adversarial_rows(m, k, seed=m + k) if m else torch.zeros(0, k)
    if m >= 3:
        x[1] = 0.0                                   # all-zero row: scale 0, codes 0
        x[2] = -3.5                                  # all-equal row
        x[0, :: 5] = 0.5 * torch.arange(x[0, :: 5].numel())  # exact halves: round half to even
    x = x.to(dtype)
    q, a = backend.quantize_per_token(x)
    q_ref, a_ref = dynamic_quant_per_token(x)
    assert q.dtype == torch.int8 and a.dtype == torch.float32 and a.shape == (m, 1)
    assert torch.equal(q, q_ref)
    assert torch.equal(a.view(torch.int32), a_ref.view(torch.int32))


def test_quantize_per_token_hands_non_finite_rows_to_torch(native):
    x = torch.randn(4, 40)
    x[2, 3] = float("inf")
    x[3, 0] = float("nan")
    q, a = native.quantize_per_token(x)
    q_ref, a_ref = dynamic_quant_per_token(x)
    assert torch.equal(q, q_ref)
    assert torch.equal(a.isnan(), a_ref.isnan()) and torch.equal(a[:3], a_ref[:3])


def test_w8a8_linear_module_is_the_same_bits_on_every_backend(native):
    g = torch.Generator().manual_seed(3)
    w = torch.randint(-127, 128, (96, 200), dtype=torch.int8, generator=g)
    s = torch.rand(96, generator=g) * 1e-2
    x = adversarial_rows(9, 200, seed=4).to(torch.bfloat16).reshape(3, 3, 200)
    from w4a8moe.moe import W8A8Linear

    fast = W8A8Linear(w, s, backend=native)
    slow = W8A8Linear(w, s, backend="reference")
    assert fast.backend.name == "cpu" and slow.backend.name == "reference"
    y = fast(x)
    assert y.shape == (3, 3, 96) and y.dtype == torch.bfloat16
    _assert_bitwise(y, slow(x))
    _assert_bitwise(y.reshape(9, 96), w8a8_linear(x.reshape(9, 200), w, s))
    assert set(fast.state_dict()) == {"weight", "weight_scale"}


@pytest.mark.parametrize("n,k", [(96, 200), (34, 37), (1, 1), (33, 4), (5, 0)])
def test_int8_linear_weight_decodes_its_layout_exactly(backend, n, k):
    g = torch.Generator().manual_seed(n * 3 + k)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    if w.numel():
        w.view(-1)[0], w.view(-1)[-1] = -128, 127
    prepared = backend.prepare_int8_linear(w, torch.rand(n, generator=g))
    assert prepared.weight is None  # the layout is the one copy
    decoded = backend.int8_linear_weight(prepared)
    assert decoded.dtype == torch.int8 and decoded.is_contiguous() and torch.equal(decoded, w)


def test_w8a8_linear_holds_its_weight_once(native):
    # The kernel's layout is the only copy: the module's buffer is dropped, and weight,
    # state_dict, a move and a switch of backend all read it back exactly.
    from w4a8moe.moe import W8A8Linear

    g = torch.Generator().manual_seed(12)
    w = torch.randint(-128, 128, (70, 130), dtype=torch.int8, generator=g)
    s = torch.rand(70, generator=g) * 1e-2
    x = adversarial_rows(5, 130, seed=1).to(torch.bfloat16)
    linear = W8A8Linear(w.clone(), s, backend=native)
    expect = w8a8_linear(x, w, s)
    assert linear._buffers["weight"] is None and linear.prepared.weight is None
    # int8 once: the layout (channels padded to 32, K to 4) and the scales, nothing else
    assert linear.prepared.layout.numel() == 96 * 132
    assert [t.numel() for t in linear.buffers()] == [70]
    assert torch.equal(linear.weight, w) and torch.equal(linear.int8_weight(), w)
    state = linear.state_dict()
    assert set(state) == {"weight", "weight_scale"} and torch.equal(state["weight"], w)
    linear.to("cpu")
    assert linear._buffers["weight"] is None
    _assert_bitwise(linear(x), expect)
    linear.set_backend("reference")
    assert torch.equal(linear._buffers["weight"], w)
    _assert_bitwise(linear(x), expect)
    linear.set_backend(native)
    assert linear._buffers["weight"] is None
    _assert_bitwise(linear(x), expect)
    copy = W8A8Linear(torch.zeros_like(w), torch.ones(70), backend="reference")
    copy.load_state_dict(state)
    copy.set_backend()
    _assert_bitwise(copy(x), expect)


def test_int8_linear_keeps_the_weight_where_int32_could_overflow(native):
    w = torch.full((2, 140_000), 3, dtype=torch.int8)
    prepared = native.prepare_int8_linear(w, torch.ones(2))
    assert prepared.weight is w and native.int8_linear_weight(prepared) is w


def test_relayout_is_four_bits_and_decodes_to_the_weights(native):
    # Decode the layout independently (as documented in the C source) and compare.
    n, k = 40, 10
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    layout = native.relayout(pack_int4_pairs(q)).numpy()
    n_pad, k_pad = 64, 12
    assert layout.size == n_pad * k_pad // 2  # still 4 bits per (padded) weight
    lines = layout.reshape(n_pad // 32, k_pad // 4, 16, 4)
    decoded = np.zeros((n_pad, k_pad), dtype=np.int64)
    for b in range(n_pad // 32):
        for lane in range(16):
            decoded[32 * b + lane] = (lines[b, :, lane, :] & 0xF).reshape(-1).astype(np.int64) - 8
            decoded[32 * b + 16 + lane] = (lines[b, :, lane, :] >> 4).reshape(-1).astype(np.int64) - 8
    assert np.array_equal(decoded[:n, :k], q.numpy())
    assert not decoded[n:].any() and not decoded[:, k:].any()  # padding is weight 0


def test_gemm_rejects_mismatched_shapes(native):
    layout = native.relayout(pack_int4_pairs(torch.zeros(32, 16, dtype=torch.int8)))
    with pytest.raises(ValueError):
        native.gemm(layout, 32, 16, torch.zeros(2, 15, dtype=torch.int8))
    with pytest.raises(ValueError):
        native.gemm(layout, 64, 16, torch.zeros(2, 16, dtype=torch.int8))


# ---- the grouped expert path ----------------------------------------------------------------


def _random_experts(e: int, h: int, inter: int, seed: int) -> PackedExpertWeights:
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randint(-8, 8, (e, 2 * inter, h), dtype=torch.int8, generator=g)
    w2 = torch.randint(-8, 8, (e, h, inter), dtype=torch.int8, generator=g)
    return PackedExpertWeights(pack_int4_pairs(w13), torch.rand(e, 2 * inter, generator=g) * 0.02 + 1e-4,
                               pack_int4_pairs(w2), torch.rand(e, h, generator=g) * 0.02 + 1e-4)


def _routing(ids: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_ids`` and ``expert_offsets`` as :meth:`W4A8MoE.routed_experts` builds them."""
    top_k = ids.shape[1] if ids.dim() == 2 else 1
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offsets = torch.zeros(e + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.bincount(flat, minlength=e), 0)
    return torch.div(order, top_k, rounding_mode="floor"), offsets


def _random_ids(m: int, e: int, top_k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if m == 0:
        return torch.zeros(0, top_k, dtype=torch.int64)
    return torch.stack([torch.randperm(e, generator=g)[:top_k] for _ in range(m)])


def _compare_with_reference(be, weights, x_q, x_scale, token_ids, offsets, alpha) -> torch.Tensor:
    reference = ReferenceBackend()
    expect = reference.grouped_forward(reference.prepare(weights), x_q, x_scale, token_ids, offsets, alpha)
    got = be.grouped_forward(be.prepare(weights), x_q, x_scale, token_ids, offsets, alpha)
    _assert_bitwise(got, expect)
    return got


@pytest.mark.parametrize(
    "e,h,inter,m,top_k",
    [
        (5, 96, 40, 13, 3),   # I not a multiple of 32: part of silu runs torch's scalar code
        (7, 70, 33, 1, 1),    # odd E, odd I, H not a multiple of 32, M = 1
        (3, 64, 64, 0, 2),    # M = 0
        (9, 130, 17, 31, 5),  # rows per expert not a multiple of the register tile
        (4, 32, 2, 6, 4),     # every expert gets every token; tiny I
    ],
)
def test_grouped_forward_matches_reference(backend, e, h, inter, m, top_k):
    weights = _random_experts(e, h, inter, seed=e + h + inter)
    x = adversarial_rows(m, h, seed=m + 1) if m else torch.zeros(0, h)
    x_q, x_scale = dynamic_quant_per_token(x)
    token_ids, offsets = _routing(_random_ids(m, e, top_k, seed=m), e)
    alpha = torch.linspace(0.05, 1.0, e)
    got = _compare_with_reference(backend, weights, x_q, x_scale, token_ids, offsets, alpha)
    assert got.shape == (m * top_k, h)


def test_grouped_forward_empty_experts_and_adversarial_rows(native):
    e, h, inter = 6, 64, 48
    weights = _random_experts(e, h, inter, seed=3)
    x = adversarial_rows(16, h, seed=5)
    x[3] = 0.0                         # all-zero row: every activation code and scale is 0
    x[4] = 1.0                         # all-equal row
    x[5, 7] = 1e4                      # one outlier token
    x_q, x_scale = dynamic_quant_per_token(x)
    ids = torch.tensor([[1, 4]] * 16)  # experts 0, 2, 3, 5 get nothing
    token_ids, offsets = _routing(ids, e)
    got = _compare_with_reference(native, weights, x_q, x_scale, token_ids, offsets, torch.ones(e))
    zero_rows = token_ids == 3
    assert bool((got[zero_rows].float() == 0).all())


def test_grouped_forward_int8_extremes(native):
    # x_q = -128 everywhere (outside what dynamic quant writes, but a kernel input all the same)
    # and weights at -8: the largest accumulations the formats allow.
    e, h, inter = 2, 64, 32
    w13 = torch.full((e, 2 * inter, h), -8, dtype=torch.int8)
    w2 = torch.full((e, h, inter), -8, dtype=torch.int8)
    weights = PackedExpertWeights(pack_int4_pairs(w13), torch.full((e, 2 * inter), 1e-3),
                                  pack_int4_pairs(w2), torch.full((e, h), 1e-3))
    x_q = torch.full((3, h), -128, dtype=torch.int8)
    token_ids, offsets = _routing(torch.tensor([[0], [1], [1]]), e)
    _compare_with_reference(native, weights, x_q, torch.full((3, 1), 0.01), token_ids, offsets, torch.ones(e))


def test_silu_tables_are_torch_silu():
    tables = cpu_mod.silu_tables()
    values = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    finite = torch.isfinite(values)
    # One element at a time is torch's scalar code; a long contiguous row its vector code.
    some = torch.randint(0, 65536, (300,))
    for i in some[finite[some]].tolist():
        assert torch.nn.functional.silu(values[i:i + 1]).view(torch.int32).item() == \
            tables.scalar[i:i + 1].view(torch.int32).item()
    vec = torch.nn.functional.silu(values[:32768])
    assert torch.equal(vec.view(torch.int32)[finite[:32768]], tables.vector[:32768].view(torch.int32)[finite[:32768]])


def test_grouped_forward_against_numpy_spec(native):
    # Independent check: GMM1 exactly, then silu with numpy's exp (not torch's), then GMM2.
    # Tolerance: numpy's silu may differ from torch's in the last fp32 bit; that can move one
    # activation code h_q by one (or the row scale by one ulp), changing an output by at most
    # c_m * s_n * 8 * (codes moved) plus a bf16 rounding step; we allow 2 codes and 2 bf16 ulps
    # and require that at most 1 % of the outputs differ at all.
    e, h, inter, m, top_k = 4, 96, 64, 12, 2
    weights = _random_experts(e, h, inter, seed=21)
    x = adversarial_rows(m, h, seed=2)
    x[5::8] = torch.randn(h)  # not the 1e30 rows: those overflow h to inf (tested against torch above)
    x_q, x_scale = dynamic_quant_per_token(x)
    token_ids, offsets = _routing(_random_ids(m, e, top_k, seed=4), e)
    alpha = torch.tensor([1.0, 0.5, 0.2, 0.9])
    got = native.grouped_forward(native.prepare(weights), x_q, x_scale, token_ids, offsets, alpha).float().numpy()
    diff_count = 0
    for ex in range(e):
        lo, hi = int(offsets[ex]), int(offsets[ex + 1])
        if lo == hi:
            continue
        rows = token_ids[lo:hi].numpy()
        q13 = unpack_int4_pairs(weights.w13[ex]).numpy()
        q2 = unpack_int4_pairs(weights.w2[ex]).numpy()
        gate_up = ref.int_matmul(x_q.numpy()[rows], x_scale.numpy()[rows], q13, weights.w13_scale[ex].numpy())
        with np.errstate(over="ignore"):  # exp(-g) overflows for very negative g: silu is then -0
            h_q, c = ref.quant_rows(ref.silu_mul(gate_up), float(alpha[ex]))
        expect = ref.int_matmul(h_q, c, q2, weights.w2_scale[ex].numpy())
        bound = 2 * 8 * c.reshape(-1, 1) * weights.w2_scale[ex].numpy().reshape(1, -1) + 2 * 2.0**-8 * np.abs(expect)
        assert bool((np.abs(got[lo:hi] - expect) <= bound).all())
        diff_count += int((got[lo:hi] != expect).sum())
    assert diff_count <= 0.01 * got.size


def test_combine_rows_against_numpy_spec():
    g = torch.Generator().manual_seed(7)
    rows = (torch.randn(23, 40, generator=g) * torch.logspace(-3, 3, 40)).to(torch.bfloat16)
    rows[4] = 0.0
    rows[5] = -0.0
    token_ids = torch.randint(0, 9, (23,), generator=g)  # token 9 of 10 has no row
    weights = torch.rand(23, generator=g)
    got = combine_rows(rows, token_ids, weights, 10)
    expect = ref.combine_rows(rows.float().numpy(), token_ids.numpy(), weights.numpy(), 10)
    assert np.array_equal(got.numpy().view(np.int32), expect.view(np.int32))
    assert bool((got[9] == 0).all())


@pytest.mark.parametrize(
    "e,h,inter,m,top_k",
    [
        (5, 96, 40, 13, 3),
        (7, 70, 33, 1, 1),    # M = 1, odd sizes
        (3, 64, 64, 0, 2),    # M = 0
        (9, 130, 17, 31, 5),
        (4, 32, 2, 6, 4),     # every expert gets every token
    ],
)
def test_combined_forward_matches_reference(backend, e, h, inter, m, top_k):
    weights = _random_experts(e, h, inter, seed=e + h)
    x = adversarial_rows(m, h, seed=m + 3) if m else torch.zeros(0, h)
    x_q, x_scale = dynamic_quant_per_token(x)
    ids = _random_ids(m, e, top_k, seed=m + 1)
    token_ids, offsets = _routing(ids, e)
    g = torch.Generator().manual_seed(m)
    row_weights = torch.rand(token_ids.numel(), generator=g)
    alpha = torch.linspace(0.3, 1.0, e)
    reference = ReferenceBackend()
    expect = reference.combined_forward(reference.prepare(weights), x_q, x_scale, token_ids, offsets, alpha,
                                        row_weights)
    got = backend.combined_forward(backend.prepare(weights), x_q, x_scale, token_ids, offsets, alpha, row_weights)
    assert got.shape == (m, h) and got.dtype == torch.float32
    _assert_bitwise(got, expect)


def test_combined_forward_tokens_without_rows(native):
    # Tokens 1 and 3 have no routed row (a caller may drop tokens): their sum is exactly 0.
    # Rows for a token arrive from different experts, so their order is not the token order.
    e, h, inter = 4, 64, 32
    weights = _random_experts(e, h, inter, seed=9)
    x_q, x_scale = dynamic_quant_per_token(adversarial_rows(5, h, seed=1))
    token_ids = torch.tensor([4, 0, 2, 0, 4, 2])
    offsets = torch.tensor([0, 2, 2, 4, 6])  # expert 1 empty
    row_weights = torch.tensor([0.5, 1.0, -2.0, 0.25, 3.0, 1e-3])
    alpha = torch.ones(e)
    reference = ReferenceBackend()
    expect = reference.combined_forward(reference.prepare(weights), x_q, x_scale, token_ids, offsets, alpha,
                                        row_weights)
    got = native.combined_forward(native.prepare(weights), x_q, x_scale, token_ids, offsets, alpha, row_weights)
    _assert_bitwise(got, expect)
    assert bool((got[[1, 3]] == 0).all())
    # No rows at all: zeros of the token count.
    empty = native.combined_forward(native.prepare(weights), x_q, x_scale, torch.zeros(0, dtype=torch.int64),
                                    torch.zeros(e + 1, dtype=torch.int64), alpha, torch.zeros(0))
    assert empty.shape == (5, h) and bool((empty == 0).all())
    with pytest.raises(ValueError, match="row_weights"):
        native.combined_forward(native.prepare(weights), x_q, x_scale, token_ids, offsets, alpha, row_weights[:3])


def test_grouped_forward_rejects_bad_routing(native):
    weights = _random_experts(3, 32, 8, seed=1)
    prepared = native.prepare(weights)
    x_q, x_scale = dynamic_quant_per_token(torch.randn(2, 32))
    with pytest.raises(cpu_mod.KernelCallError):
        native.grouped_forward(prepared, x_q, x_scale, torch.tensor([0, 5]), torch.tensor([0, 2, 2, 2]),
                               torch.ones(3))
    with pytest.raises(cpu_mod.KernelCallError):
        native.grouped_forward(prepared, x_q, x_scale, torch.tensor([0, 1]), torch.tensor([0, 2, 1, 2]),
                               torch.ones(3))
    with pytest.raises(ValueError):
        native.grouped_forward(prepared, x_q, x_scale, torch.tensor([0, 1]), torch.tensor([0, 1, 1, 1]),
                               torch.ones(3))


def test_swiglu_step_matches_quant_function(native):
    # The kernel's h_q feeds GMM2; check the whole path against the quant functions chained by
    # hand for one expert with identity-like GMM2 inputs (one row per token).
    e, h, inter = 1, 32, 24
    weights = _random_experts(e, h, inter, seed=5)
    x_q, x_scale = dynamic_quant_per_token(torch.randn(4, h))
    token_ids, offsets = _routing(torch.zeros(4, 1, dtype=torch.int64), e)
    got = native.grouped_forward(native.prepare(weights), x_q, x_scale, token_ids, offsets, torch.tensor([0.3]))
    gate_up = scaled_int_matmul(x_q, x_scale, unpack_int4_pairs(weights.w13[0]), weights.w13_scale[0])
    h_q, c = swiglu_clip_quant(gate_up, 0.3)
    _assert_bitwise(got, scaled_int_matmul(h_q, c, unpack_int4_pairs(weights.w2[0]), weights.w2_scale[0]))


# ---- the layer, selection, build and fallback -------------------------------------------------


@pytest.mark.parametrize("model_type", ["deepseek_v3", "qwen2_moe", "mixtral"])
@pytest.mark.parametrize("m", [1, 7, 64])
def test_layer_cpu_equals_reference(native, model_type, m):
    cfg = tiny_config(model_type)
    mc = MoEModelConfig.from_dict(cfg)
    layer_q = quantize_moe_layer(random_float_moe_layer(cfg, seed=m, alpha=torch.linspace(0.3, 1.0, mc.num_experts)))
    x = (torch.randn(m, mc.hidden_size) * 2).to(torch.bfloat16)
    x[0, 5] = 90.0  # an outlier activation
    cpu_layer = W4A8MoE.from_quantized(layer_q, mc.routing, backend="cpu")
    ref_layer = W4A8MoE.from_quantized(layer_q, mc.routing, backend="reference")
    assert cpu_layer.backend.name == "cpu"
    if cpu_layer.shared is not None:  # the shared expert runs on the layer's backend too
        assert cpu_layer.shared.gate_up_proj.backend.name == "cpu"
        assert ref_layer.shared.gate_up_proj.backend.name == "reference"
    _assert_bitwise(cpu_layer(x), ref_layer(x))
    cpu_layer.apply_alpha = ref_layer.apply_alpha = False
    _assert_bitwise(cpu_layer(x), ref_layer(x))


def test_backend_selection(native, monkeypatch):
    monkeypatch.setenv("W4A8MOE_BACKEND", "reference")
    assert get_backend().name == "reference"
    monkeypatch.setenv("W4A8MOE_BACKEND", "cpu")
    assert get_backend().name == "cpu"
    monkeypatch.delenv("W4A8MOE_BACKEND")
    assert get_backend().name == "cpu"  # preferred where it can run
    assert available_backends()[:2] == ["cpu", "reference"]


def test_no_compiler_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(cpu_mod, "_compiler", lambda: None)
    monkeypatch.setattr(cpu_mod, "_WARNED", False)
    monkeypatch.delenv("W4A8MOE_BACKEND", raising=False)
    cpu_mod.load_kernel.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cpu_mod.cpu_backend_factory() is None
            assert get_backend().name == "reference"
            assert available_backends() == ["reference"]
        assert len([w for w in caught if "CPU kernel unavailable" in str(w.message)]) == 1
        with pytest.raises(RuntimeError):
            get_backend("cpu")
    finally:
        cpu_mod.load_kernel.cache_clear()


def test_build_cache_is_keyed_and_shared_by_concurrent_builds(tmp_path):
    # Two processes compile into an empty cache at once: both load a complete library, one
    # file results, and no temporary files are left behind.
    script = ("from w4a8moe.kernels.cpu import load_kernel; "
              "lib = load_kernel('avx2-maddubs'); print(lib.path.name, lib.isa)")
    env = dict(os.environ, W4A8MOE_CACHE_DIR=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    if any(p.returncode != 0 for p in procs):
        pytest.skip("the kernel cannot be built here")
    assert outs[0] == outs[1] and outs[0][1] == "avx2"
    files = sorted(f.name for f in tmp_path.iterdir())
    assert files == [outs[0][0]]
    assert files[0].startswith("w4a8_cpu_") and files[0].endswith(".so")


def _silu_divergent_bf16() -> torch.Tensor:
    """bf16 inputs whose silu differs (in the last fp32 bit) between torch's vector and scalar code."""
    tables = cpu_mod.silu_tables()
    differs = (tables.vector.view(torch.int32) != tables.scalar.view(torch.int32)) & ~torch.isnan(tables.vector)
    return differs.nonzero().reshape(-1).to(torch.int16).view(torch.bfloat16)


@pytest.mark.parametrize("rows,inter", [(3, 40), (901, 41), (2001, 47), (21, 2048), (33, 1)])
def test_swiglu_h_is_bitwise_torch_including_its_scalar_code(native, rows, inter):
    # Gates drawn only from the inputs where torch's two silu codes disagree, so every element
    # that torch computes with its scalar code (row tails, and the pieces around its thread
    # split once rows * I exceeds the grain size) shows whether the kernel did the same.
    divergent = _silu_divergent_bf16()
    if divergent.numel() == 0:
        pytest.skip("torch's vector and scalar silu agree on every bf16 input here")
    g = torch.Generator().manual_seed(rows + inter)
    gate = divergent[torch.randint(0, divergent.numel(), (rows, inter), generator=g)]
    up = torch.randn(rows, inter, generator=g).to(torch.bfloat16)
    gate_up = torch.cat((gate, up), dim=1)
    saved = torch.get_num_threads()
    try:
        for threads in sorted({1, 2, 3, saved}):
            torch.set_num_threads(threads)
            h, h_q, c = native.swiglu_clip_quant(gate_up, 0.6)
            assert torch.equal(h.view(torch.int32), swiglu_fp32(gate_up).view(torch.int32))
            expect_q, expect_c = swiglu_clip_quant(gate_up, 0.6)
            assert torch.equal(h_q, expect_q) and torch.equal(c.view(torch.int32), expect_c.view(torch.int32))
    finally:
        torch.set_num_threads(saved)


def test_swiglu_clip_quant_adversarial_rows(native):
    # Zero rows (c = 0), all-equal rows, ties at .5 after scaling, heavy clipping (alpha small).
    gate_up = adversarial_rows(24, 2 * 36, seed=9)
    gate_up[5::8] = torch.randn(2 * 36)  # 1e30 rows overflow h to inf; covered in the grouped tests
    gate_up = gate_up.to(torch.bfloat16)
    for alpha in (1.0, 0.37, 1e-3):
        _, h_q, c = native.swiglu_clip_quant(gate_up, alpha)
        expect_q, expect_c = swiglu_clip_quant(gate_up, alpha)
        assert torch.equal(h_q, expect_q) and torch.equal(c, expect_c)
        assert bool((h_q[2::8] == 0).all()) and bool((c[2::8] == 0).all())


# ---- a W8A8 gated MLP (shared expert, dense MLP) in one call ---------------------------------


def _code_sensitive_silu_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 (gate, up) pairs whose silu_and_mul differs, after its rounding to bf16, between
    torch's vector and scalar silu (few: the two codes are 1 fp32 ulp apart on 122 inputs)."""
    tables = cpu_mod.silu_tables()
    divergent = ((tables.vector.view(torch.int32) != tables.scalar.view(torch.int32))
                 & ~torch.isnan(tables.vector)).nonzero().reshape(-1)
    ups = cpu_mod._all_bf16()
    gates, chosen = [], []
    for i in divergent.tolist():
        a = (tables.vector[i] * ups.float()).to(torch.bfloat16)
        b = (tables.scalar[i] * ups.float()).to(torch.bfloat16)
        hit = (a.view(torch.int16) != b.view(torch.int16)) & torch.isfinite(a.float()) & torch.isfinite(b.float())
        for j in hit.nonzero().reshape(-1).tolist():
            gates.append(i)
            chosen.append(j)
    as_bf16 = lambda idx: torch.tensor(idx, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)  # noqa: E731
    return as_bf16(gates), ups[torch.tensor(chosen, dtype=torch.int64)] if chosen else ups[:0]


@pytest.mark.parametrize("rows,inter", [(3, 40), (901, 41), (40, 1001), (21, 2048), (33, 1), (1, 2048)])
def test_silu_and_mul_is_bitwise_torch_including_its_scalar_code(native, rows, inter):
    # Every element a (gate, up) pair whose bf16 result tells torch's two silu codes apart, so
    # each element torch computes with its scalar code (the tail of each thread's chunk of the
    # contiguous fp32 gate, once rows * I exceeds the grain size) shows whether the kernel did.
    gates, ups = _code_sensitive_silu_pairs()
    if gates.numel() == 0:
        pytest.skip("torch's vector and scalar silu give the same bf16 products here")
    g = torch.Generator().manual_seed(rows * 7 + inter)
    pick = torch.randint(0, gates.numel(), (rows, inter), generator=g)
    gate_up = torch.cat((gates[pick], ups[pick]), dim=1)
    saved = torch.get_num_threads()
    try:
        for threads in sorted({1, 2, 3, saved}):
            torch.set_num_threads(threads)
            _assert_bitwise(native.silu_and_mul(gate_up), silu_and_mul(gate_up[:, :inter], gate_up[:, inter:]))
    finally:
        torch.set_num_threads(saved)


def _w8a8_projections(shapes: list[tuple[int, int]], seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, k in shapes:
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        out.append((w, (torch.rand(n, generator=g) + 0.05) * 0.02 / max(k, 1) ** 0.5))
    return out


def _gated_mlp(projections, backend):
    from w4a8moe.moe import W8A8Linear
    from w4a8moe.moe.layer import GatedMLP

    return GatedMLP(*(W8A8Linear(w, s, backend=backend) for w, s in projections))


@pytest.mark.parametrize("m,k,inter,n", [(1, 512, 256, 512), (9, 37, 41, 33), (0, 16, 8, 16), (33, 64, 1, 5),
                                         (300, 96, 130, 40), (2, 7168, 2048, 7168)])
def test_gated_mlp_in_one_call_is_the_three_linears(backend, m, k, inter, n):
    # The one call against the definition (w8a8_linear, silu_and_mul, w8a8_linear: torch, no
    # backend) and the reference backend's modules, bitwise, on adversarial rows.
    if backend.isa != "avx512-vnni" and k * n > 10**6:
        pytest.skip("DeepSeek-V3 shapes only on the native ISA (time)")
    gate, up, down = _w8a8_projections([(inter, k), (inter, k), (n, inter)], seed=m + k + inter)
    x = adversarial_rows(m, k, seed=m + n).to(torch.bfloat16) if m else torch.zeros(0, k, dtype=torch.bfloat16)
    x[5::8] = torch.randn(x[5::8].shape).to(torch.bfloat16)  # the 1e30 rows: tested below
    mlp = _gated_mlp([gate, up, down], backend)
    assert mlp.gate_up_proj is not None
    x_q, x_scale = backend.quantize_per_token(x)
    one_call = backend.gated_mlp_int8(mlp.gate_up_proj.prepared, mlp.down_proj.prepared, x_q, x_scale)
    assert one_call is not None and one_call.shape == (m, n) and one_call.dtype == torch.bfloat16
    expect = w8a8_linear(silu_and_mul(w8a8_linear(x, *gate), w8a8_linear(x, *up)), *down)
    _assert_bitwise(one_call, expect)
    _assert_bitwise(mlp(x), expect)
    _assert_bitwise(mlp(x, (x_q, x_scale)), expect)
    _assert_bitwise(_gated_mlp([gate, up, down], "reference")(x), expect)


def test_gated_mlp_in_one_call_against_numpy_spec(native):
    # Independent: numpy's exp is not torch's, so silu may differ in its last fp32 bit; after the
    # rounding to bf16 that rarely moves h at all, and a moved h moves at most a code or a row
    # scale of the down projection's input: at most 1 % of the outputs may differ.
    gate, up, down = _w8a8_projections([(96, 160), (96, 160), (130, 96)], seed=5)
    x = adversarial_rows(24, 160, seed=6)
    x[5::8] = torch.randn(x[5::8].shape)
    x = x.to(torch.bfloat16)
    got = _gated_mlp([gate, up, down], native)(x).float().numpy()
    expect = ref.w8a8_mlp(x.float().numpy(), *((w.numpy(), s.numpy()) for w, s in (gate, up, down)))
    assert got.shape == expect.shape
    assert int((got != expect).sum()) <= 0.01 * got.size
    assert np.allclose(got, expect, rtol=0.05, atol=float(np.abs(expect).max()) * 0.02)


def test_gated_mlp_hands_non_finite_activations_to_torch(native):
    # Rows of 1e30 overflow silu(g) * u to inf: the kernel reports it and the module runs the
    # three Linears, whose torch quantization of inf is the definition.
    gate, up, down = _w8a8_projections([(48, 64), (48, 64), (32, 48)], seed=8)
    x = torch.randn(4, 64)
    x[2] = 1e30
    x = x.to(torch.bfloat16)
    gate[1].fill_(1e30)
    up[1].fill_(1e30)
    mlp = _gated_mlp([gate, up, down], native)
    x_q, x_scale = native.quantize_per_token(x)
    assert native.gated_mlp_int8(mlp.gate_up_proj.prepared, mlp.down_proj.prepared, x_q, x_scale) is None
    expect = w8a8_linear(silu_and_mul(w8a8_linear(x, *gate), w8a8_linear(x, *up)), *down)
    _assert_bitwise(mlp(x), expect)


def test_gated_mlp_in_one_call_rejects_mismatched_projections(native):
    gate, up, down = _w8a8_projections([(48, 64), (48, 64), (32, 40)], seed=9)
    prepare = lambda p: native.prepare_int8_linear(*p)  # noqa: E731
    gate_up = native.prepare_int8_linear(torch.cat((gate[0], up[0])), torch.cat((gate[1], up[1])))
    x_q, x_scale = native.quantize_per_token(torch.randn(3, 64))
    with pytest.raises(ValueError, match="down"):
        native.gated_mlp_int8(gate_up, prepare(down), x_q, x_scale)
    with pytest.raises(ValueError, match="x_q"):
        native.gated_mlp_int8(gate_up, prepare(_w8a8_projections([(32, 48)], 1)[0]), x_q[:, :60], x_scale)


# ---- the whole MoE block in one call ---------------------------------------------------------


def _block_definition(weights, x, topk_weights, ids, alpha, scaling, shared) -> torch.Tensor:
    """The block by its definition: torch's quantization and sort, the reference backend's
    combined expert path, the W8A8 shared expert by w8a8_linear and silu_and_mul, and the
    sum as W4A8MoE.forward forms it (fp32, then bf16). No native code."""
    from w4a8moe.moe.routing import sort_rows_by_expert

    e = weights.w13.shape[0]
    x_q, x_scale = dynamic_quant_per_token(x)
    rows = sort_rows_by_expert(ids, e, topk_weights)
    reference = ReferenceBackend()
    out = reference.combined_forward(reference.prepare(weights), x_q, x_scale, rows.token_ids, rows.offsets, alpha,
                                     rows.row_weights).mul_(scaling)
    if shared is not None:
        gate, up, down = shared
        out.add_(w8a8_linear(silu_and_mul(w8a8_linear(x, *gate), w8a8_linear(x, *up)), *down).to(torch.float32))
    return out.to(torch.bfloat16)


def _block_call(be, weights, x, topk_weights, ids, alpha, scaling, shared):
    projections = None
    if shared is not None:
        gate, up, down = shared
        projections = (be.prepare_int8_linear(torch.cat((gate[0], up[0])), torch.cat((gate[1], up[1]))),
                       be.prepare_int8_linear(*down))
    return be.moe_block(be.prepare(weights), x, topk_weights, ids, alpha, scaling, projections)


@pytest.mark.parametrize(
    "e,h,inter,m,top_k,s_inter,scaling",
    [
        (5, 96, 40, 13, 3, 24, 2.5),
        (7, 70, 33, 1, 1, 17, 2.826),      # M = 1, odd sizes, a factor fp32 cannot hold
        (9, 130, 17, 31, 5, None, 1.0),    # no shared expert
        (4, 32, 2, 6, 4, 3, 16.0 / 7),     # every expert gets every token; tiny I
        (16, 64, 64, 3, 2, 64, 1.0 / 3),   # most experts empty
        (6, 256, 128, 70, 6, 96, -0.75),   # more tokens than a register tile, a negative factor
    ],
)
def test_moe_block_in_one_call_is_its_parts(backend, e, h, inter, m, top_k, s_inter, scaling):
    weights = _random_experts(e, h, inter, seed=e + h + m)
    x = adversarial_rows(m, h, seed=m + 7)
    x[5::8] = torch.randn(x[5::8].shape)  # 1e30 rows overflow the shared activation: tested below
    x = x.to(torch.bfloat16)
    ids = _random_ids(m, e, top_k, seed=m + 2)
    g = torch.Generator().manual_seed(m)
    topk_weights = torch.rand(m, top_k, generator=g)
    alpha = torch.linspace(0.2, 1.0, e)
    shared = None if s_inter is None else _w8a8_projections([(s_inter, h), (s_inter, h), (h, s_inter)], seed=m)
    expect = _block_definition(weights, x, topk_weights, ids, alpha, scaling, shared)
    saved = torch.get_num_threads()
    try:
        # torch's silu runs part of a row in its scalar code depending on its thread count.
        for threads in sorted({1, saved}):
            torch.set_num_threads(threads)
            got = _block_call(backend, weights, x, topk_weights, ids, alpha, scaling, shared)
            assert got is not None and got.shape == (m, h) and got.dtype == torch.bfloat16
            _assert_bitwise(got, expect)
    finally:
        torch.set_num_threads(saved)


def test_moe_block_in_one_call_at_deepseek_v3_shapes(native):
    # The real widths (H = 7168, I = 2048), where each phase is thousands of weight blocks.
    e, h, inter = 4, 7168, 2048
    weights = _random_experts(e, h, inter, seed=3)
    x = (torch.randn(3, h) * 0.5).to(torch.bfloat16)
    ids = torch.tensor([[0, 2], [3, 2], [1, 0]])
    topk_weights = torch.rand(3, 2)
    shared = _w8a8_projections([(inter, h), (inter, h), (h, inter)], seed=4)
    alpha = torch.tensor([0.9, 0.5, 1.0, 0.7])
    _assert_bitwise(_block_call(native, weights, x, topk_weights, ids, alpha, 2.5, shared),
                    _block_definition(weights, x, topk_weights, ids, alpha, 2.5, shared))


def test_moe_block_after_other_calls_grew_its_scratch(native):
    # moe_block keeps its scratch pointers between calls of one size: a call in between that
    # grows the shared scratch (combined_forward with more rows) must not leave them stale.
    e, h, inter = 4, 64, 32
    weights = _random_experts(e, h, inter, seed=6)
    x = adversarial_rows(3, h, seed=2)
    x[5::8] = 0.0
    x = x.to(torch.bfloat16)
    ids, topk_weights, alpha = _random_ids(3, e, 2, seed=4), torch.rand(3, 2), torch.linspace(0.5, 1.0, e)
    shared = _w8a8_projections([(24, h), (24, h), (h, 24)], seed=5)
    expect = _block_definition(weights, x, topk_weights, ids, alpha, 1.5, shared)
    _assert_bitwise(_block_call(native, weights, x, topk_weights, ids, alpha, 1.5, shared), expect)
    big_q, big_s = dynamic_quant_per_token(torch.randn(50, h))
    token_ids, offsets = _routing(_random_ids(50, e, 4, seed=7), e)
    native.combined_forward(native.prepare(weights), big_q, big_s, token_ids, offsets, alpha,
                            torch.rand(token_ids.numel()))
    _assert_bitwise(_block_call(native, weights, x, topk_weights, ids, alpha, 1.5, shared), expect)


def test_moe_block_hands_non_finite_rows_to_torch(native):
    e, h, inter = 4, 64, 32
    weights = _random_experts(e, h, inter, seed=2)
    ids, topk_weights, alpha = _random_ids(4, e, 2, seed=1), torch.rand(4, 2), torch.ones(e)
    shared = _w8a8_projections([(48, h), (48, h), (h, 48)], seed=3)
    x = torch.randn(4, h).to(torch.bfloat16)
    x[1, 3] = float("inf")  # an input row torch quantizes its own way
    assert _block_call(native, weights, x, topk_weights, ids, alpha, 1.0, shared) is None
    x = torch.randn(4, h)
    x[2] = 1e30
    shared[0][1].fill_(1e30)
    shared[1][1].fill_(1e30)  # silu(g) * u overflows to inf in row 2
    assert _block_call(native, weights, x.to(torch.bfloat16), topk_weights, ids, alpha, 1.0, shared) is None


def test_moe_block_rejects_bad_input(native):
    e, h, inter = 3, 32, 8
    weights = _random_experts(e, h, inter, seed=1)
    x = torch.randn(2, h).to(torch.bfloat16)
    ones = torch.ones(2, 2)
    with pytest.raises(cpu_mod.KernelCallError):
        _block_call(native, weights, x, ones, torch.tensor([[0, 3], [1, 2]]), torch.ones(e), 1.0, None)
    with pytest.raises(ValueError, match="x must be bf16"):
        _block_call(native, weights, x.float(), ones, torch.tensor([[0, 1], [1, 2]]), torch.ones(e), 1.0, None)
    with pytest.raises(ValueError, match="topk_ids"):
        _block_call(native, weights, x, ones[:, :1], torch.tensor([[0, 1], [1, 2]]), torch.ones(e), 1.0, None)
    with pytest.raises(ValueError, match="shared expert"):
        _block_call(native, weights, x, ones, torch.tensor([[0, 1], [1, 2]]), torch.ones(e), 1.0,
                    _w8a8_projections([(8, h), (8, h), (h + 1, 8)], seed=2))
    empty = _block_call(native, weights, x[:0], ones[:0], torch.zeros(0, 2, dtype=torch.int64), torch.ones(e), 1.0,
                        None)
    assert empty.shape == (0, h)


@pytest.mark.parametrize("model_type", ["deepseek_v3", "qwen2_moe"])
def test_layer_runs_the_block_in_one_call_with_the_bits_of_its_parts(native, model_type, monkeypatch):
    # W4A8MoE.forward takes the one call where the shared expert allows it (DeepSeek's W8A8 one;
    # not Qwen2-MoE's gated one) and gives the bits of the separate calls either way.
    cfg = tiny_config(model_type)
    mc = MoEModelConfig.from_dict(cfg)
    layer_q = quantize_moe_layer(random_float_moe_layer(cfg, seed=4, alpha=torch.linspace(0.3, 1.0, mc.num_experts)))
    routing = type(mc.routing)(**{**mc.routing.__dict__, "routed_scaling_factor": 2.826})
    layer = W4A8MoE.from_quantized(layer_q, routing, backend="cpu")
    calls = []
    one_call = native.moe_block.__func__
    monkeypatch.setattr(cpu_mod.CpuBackend, "moe_block", lambda self, *a: calls.append(1) or one_call(self, *a))
    x = (torch.randn(9, mc.hidden_size) * 2).to(torch.bfloat16)
    x[0, 5] = 90.0
    got = layer(x)
    fused = model_type == "deepseek_v3"
    assert len(calls) == (1 if fused else 0)
    monkeypatch.setattr(cpu_mod.CpuBackend, "moe_block", None)
    _assert_bitwise(got, layer(x))
    ref_layer = W4A8MoE.from_quantized(layer_q, routing, backend="reference")
    _assert_bitwise(got, ref_layer(x))


def test_weight_buffers_are_aligned_huge_page_mappings():
    small = cpu_mod.weight_buffer(1000)
    assert small.numel() == 1000 and small.dtype == torch.uint8
    big = cpu_mod.weight_buffer(5 * cpu_mod.HUGE_PAGE + 12345)
    assert big.numel() == 5 * cpu_mod.HUGE_PAGE + 12345 and big.is_contiguous()
    if not hasattr(__import__("mmap"), "MADV_HUGEPAGE"):
        return
    assert big.data_ptr() % cpu_mod.HUGE_PAGE == 0
    big.fill_(3)
    import gc

    gc.collect()  # the tensor alone keeps its mapping
    assert int(big[-1]) == 3 and int(big.sum()) == 3 * big.numel()
    # The mapping holding it asks for huge pages (VmFlags "hg"), whatever the OS then gives.
    address, flags = big.data_ptr(), None
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("VmFlags:"):
                flags = line.split()[1:]
    assert flags is not None and "hg" in flags


# ---- the clip search's products: int_matmul and the fused int4 weight operand ----------------


@pytest.mark.parametrize("n,k,m", [(64, 256, 8), (33, 70, 13), (1, 1, 1), (5, 7, 3), (48, 130, 0), (0, 9, 4),
                                   (7, 0, 2), (130, 1031, 37)])
@pytest.mark.parametrize("int_mm", [False, True], ids=["kernel", "int_mm"])
def test_int_matmul_is_exact(backend, n, k, m, int_mm):
    backend.int_mm_products = int_mm
    g = torch.Generator().manual_seed(n * 31 + k + m)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    if m and n and k:
        a[0] = -128  # the extremes, and a zero row
        b[0] = -128
        a[-1] = 0
    acc = backend.int_matmul(a, b)
    assert acc.dtype == torch.int32 and acc.shape == (m, n)
    assert torch.equal(acc, int8_matmul_int32(a, b))
    assert torch.equal(acc, ReferenceBackend().int_matmul(a, b))
    assert np.array_equal(acc.numpy(), a.numpy().astype(np.int64) @ b.numpy().astype(np.int64).T)


def test_int_matmul_rejects_bad_operands(native):
    with pytest.raises(ValueError, match="int_matmul expects int8"):
        native.int_matmul(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(2, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="int_matmul expects int8"):
        native.int_matmul(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int8))


def _weights_for_int4_operand(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 weights and scales with exact rounding ties, clamped values, zeros and outliers."""
    from w4a8moe.quant import per_channel_scale

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[:, :: max(1, k // 5)] *= 40.0  # outlier columns
    scale = per_channel_scale(w.abs().amax(dim=-1), 7, 0.6)  # clipped: values beyond +-7 clamp
    if n > 2:
        w[1] = 0.0  # an all-zero channel (scale 1 from per_channel_scale's rule)
        scale[1] = 1.0
        ties = (torch.arange(k) % 16 - 8).to(torch.float32) + 0.5  # -7.5 .. 7.5: half-way cases
        w[2], scale[2] = ties * 0.25, 0.25  # exact in fp32: w / s is exactly x.5
    return w, scale


@pytest.mark.parametrize("int_mm", [False, True], ids=["kernel", "int_mm"])
@pytest.mark.parametrize("n,k", [(1, 1), (3, 5), (33, 70), (64, 256), (40, 1031), (2048 // 16, 96)])
def test_quantize_int4_operand_is_quantize_with_scale(backend, n, k, int_mm):
    from w4a8moe.quant import quantize_with_scale

    backend.int_mm_products = int_mm  # torch._int_mm on row-major values (AMX CPUs), or the kernel
    w, scale = _weights_for_int4_operand(n, k, seed=n + k)
    q = quantize_with_scale(w, scale, 7)
    operand = backend.quantize_int4_operand(w, scale)
    if int_mm:
        assert operand.layout is None and torch.equal(operand.values, q)
    else:
        assert operand.layout.numel() == backend.kernel.lib.w4a8_layout_bytes(n, k)  # 4 bits per weight
    # The identity as input reads the values back exactly: acc[j, c] = q[c, j].
    eye = torch.eye(k, dtype=torch.int8)
    assert torch.equal(backend.operand_int_matmul(eye, operand), q.T.to(torch.int32))
    g = torch.Generator().manual_seed(k)
    x = torch.randint(-128, 128, (19, k), dtype=torch.int8, generator=g)
    assert torch.equal(backend.operand_int_matmul(x, operand), int8_matmul_int32(x, q))
    # The same values the SPEC-4 packing and the kernel's own re-layout give.
    if n % 2 == 0 and not int_mm:
        assert torch.equal(operand.layout, backend.relayout(pack_int4_pairs(q)))


@pytest.mark.parametrize("int_mm", [False, True], ids=["kernel", "int_mm"])
def test_quantize_int4_operands_under_several_scales_over_reused_memory(native, int_mm):
    # One pass for several scale vectors, written over operands handed back: each equals its
    # own quantize_with_scale, and a reused operand of another shape is not written over.
    from w4a8moe.quant import quantize_with_scale

    native.int_mm_products = int_mm
    w, scale = _weights_for_int4_operand(40, 1031, seed=3)
    scales = [scale * f for f in (1.0, 0.7, 1.9)]
    other = native.quantize_int4_operand(w[:8], scale[:8])
    first = native.quantize_int4_operands(w, scales[:2])
    made = native.quantize_int4_operands(w, scales, [first[0], other, first[1]])
    kind = "values" if int_mm else "layout"
    assert getattr(made[0], kind) is getattr(first[0], kind) and getattr(made[2], kind) is getattr(first[1], kind)
    assert getattr(made[1], kind) is not getattr(other, kind)
    x = torch.randint(-128, 128, (5, 1031), dtype=torch.int8)
    for operand, s in zip(made, scales):
        assert torch.equal(native.operand_int_matmul(x, operand), int8_matmul_int32(x, quantize_with_scale(w, s, 7)))


def test_quantize_int4_operand_rejects_bad_inputs(native):
    with pytest.raises(ValueError, match="fp32"):
        native.quantize_int4_operand(torch.zeros(4, 4, dtype=torch.bfloat16), torch.ones(4))
    with pytest.raises(ValueError, match="4 scales"):
        native.quantize_int4_operand(torch.zeros(4, 4), torch.ones(3))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n", [(1, 1), (7, 33), (64, 300), (200, 257)])
def test_scaled_squared_error_is_the_torch_steps(native, out_dtype, m, n):
    from w4a8moe.quant import scale_int32

    g = torch.Generator().manual_seed(m * n)
    acc = torch.randint(-2**30, 2**30, (m, n), dtype=torch.int32, generator=g)
    acc[0, 0] = 0
    x_scale = torch.rand(m, 1, generator=g) * torch.logspace(-8, 2, m).unsqueeze(1)
    w_scale = torch.rand(n, generator=g) * 0.01
    reference = torch.randn(m, n, generator=g, dtype=torch.float64) * 1e3
    expected = (scale_int32(acc, x_scale, w_scale, out_dtype).to(torch.float64) - reference) ** 2
    got = native.scaled_squared_error(acc, x_scale, w_scale, reference, out_dtype)
    assert torch.equal(got.view(torch.int64), expected.view(torch.int64))
