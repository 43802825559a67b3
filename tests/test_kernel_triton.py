"""The ``triton`` backend against the reference backend, bit for bit.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (``tests/conftest.py``
sets ``TRITON_INTERPRET=1`` before anything imports triton); with one (and the interpreter
off) the same tests run the compiled kernels on CUDA tensors against the reference run on
the CPU. Shapes are tiny and odd: the interpreter is slow, and odd sizes exercise the masks.
The whole module skips where ``triton`` is not installed.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install -e '.[triton]')", allow_module_level=True)

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    # tests/conftest.py sets it before anything imports triton (it is read at that import).
    raise RuntimeError("no GPU and TRITON_INTERPRET is not 1: the triton tests cannot run their kernels")

from tests.conftest import adversarial_rows  # noqa: E402
from tests.test_kernel_cpu import _random_experts, _random_ids, _routing  # noqa: E402
from w4a8moe.kernels import PackedExpertWeights, available_backends, combine_rows, get_backend  # noqa: E402
from w4a8moe.kernels.reference import ReferenceBackend  # noqa: E402
from w4a8moe.kernels.triton_backend import GemmConfig, TritonBackend  # noqa: E402
from w4a8moe.quant import (  # noqa: E402
    dynamic_quant_per_token,
    scaled_int_matmul,
    swiglu_clip_quant,
    unpack_int4_pairs,
)

DEVICE = torch.device("cuda" if CUDA else "cpu")
SMALL = GemmConfig(16, 16, 32)  # many tiles, K-tails and N-tails on tiny shapes
REFERENCE = ReferenceBackend()


def _runtime():
    """The layer modules (they import the checkpoint formats, whose dependencies a bare GPU
    box may lack: the kernel tests run without them)."""
    pytest.importorskip("compressed_tensors")
    from w4a8moe import moe

    return moe


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else (t.view(torch.int32) if t.dtype == torch.float32
                                                                     else t)


def _differences(got: torch.Tensor, expect: torch.Tensor) -> torch.Tensor:
    """Where the bits differ. NaN payloads are not part of the contract (torch's own bf16 cast
    writes 0x7FC0 or 0xFFFF depending on its code path); a NaN must still meet a NaN."""
    assert got.shape == expect.shape and got.dtype == expect.dtype, (got.shape, got.dtype, expect.shape, expect.dtype)
    diff = _bits(got) != _bits(expect)
    if got.is_floating_point():
        diff &= ~(torch.isnan(got.cpu()) & torch.isnan(expect.cpu()))
    return diff


def _assert_bitwise(got: torch.Tensor, expect: torch.Tensor) -> None:
    diff = _differences(got, expect)
    assert not bool(diff.any()), f"{int(diff.sum())} of {diff.numel()} elements differ, first at {diff.nonzero()[0]}"


def _dev(*tensors: torch.Tensor):
    return tuple(t.to(DEVICE) for t in tensors)


def _on_device(w: PackedExpertWeights) -> PackedExpertWeights:
    return PackedExpertWeights(*_dev(w.w13, w.w13_scale, w.w2, w.w2_scale))


# ---- pieces -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,k", [(1, 7), (9, 37), (8, 130)])
def test_quantize_per_token_is_the_reference_bit_for_bit(dtype, m, k):
    x = adversarial_rows(m, k, seed=m * k).to(dtype)
    expect_q, expect_s = dynamic_quant_per_token(x)
    got_q, got_s = TritonBackend().quantize_per_token(x.to(DEVICE))
    _assert_bitwise(got_q, expect_q)
    _assert_bitwise(got_s, expect_s)


@pytest.mark.parametrize("config", [SMALL, None], ids=["small-tiles", "default-tiles"])
def test_grouped_gemm_int32_is_exact_with_empty_experts(config):
    # Raw int32 GMM1 accumulations: -128 activations, -8 nibbles, experts with no rows,
    # one expert with more rows than a tile.
    e, h, inter = 5, 72, 21
    weights = _random_experts(e, h, inter, seed=1)
    g = torch.Generator().manual_seed(2)
    x_q = torch.randint(-128, 128, (23, h), dtype=torch.int8, generator=g)
    x_q[0] = -128
    ids = torch.tensor([[4, 1]] * 20 + [[1, 4]] * 2 + [[2, 4]])  # experts 0 and 3 empty, expert 4: 23 rows
    token_ids, offsets = _routing(ids, e)
    be = TritonBackend(config)
    (x_d, w13_d, ids_d, off_d) = _dev(x_q, weights.w13, token_ids, offsets)
    got = be._grouped_gemm(x_d, None, ids_d, w13_d, None, off_d, token_ids.numel(), 2 * inter, True,
                           config or SMALL).cpu()
    for ex in range(e):
        rows = token_ids[offsets[ex]:offsets[ex + 1]]
        expect = x_q[rows].to(torch.int64) @ unpack_int4_pairs(weights.w13[ex]).to(torch.int64).T
        assert torch.equal(got[offsets[ex]:offsets[ex + 1]].to(torch.int64), expect), ex


def test_swiglu_clip_quant_matches_spec2_per_expert():
    g = torch.Generator().manual_seed(3)
    inter = 29
    gate_up = (torch.randn(11, 2 * inter, generator=g) * 3).to(torch.bfloat16)
    gate_up[2] = 0.0                                  # all-zero row: scale 0, codes 0
    gate_up[5, 4] = 3.0e4                             # one huge outlier
    gate_up[6, inter + 1] = -2.0e4
    offsets = torch.tensor([0, 4, 4, 11])             # expert 1 empty
    alpha = torch.tensor([0.3, 0.9, 1.0])
    h_q, h_scale = TritonBackend().swiglu_clip_quant(*_dev(gate_up, alpha, offsets))
    for ex in range(3):
        lo, hi = int(offsets[ex]), int(offsets[ex + 1])
        if lo == hi:
            continue
        expect_q, expect_s = swiglu_clip_quant(gate_up[lo:hi], alpha[ex])
        _assert_bitwise(h_q[lo:hi], expect_q)
        _assert_bitwise(h_scale[lo:hi].reshape(-1, 1), expect_s)
    assert bool((h_q[2].cpu() == 0).all()) and float(h_scale[2]) == 0.0


def test_int_matmul_is_exact_on_odd_shapes_and_extremes():
    be = TritonBackend(SMALL)
    g = torch.Generator().manual_seed(4)
    for m, n, k in [(1, 1, 1), (19, 13, 70), (3, 40, 33)]:
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        a[0] = -128
        b[0] = -128
        got = be.int_matmul(*_dev(a, b)).cpu()
        assert got.dtype == torch.int32
        assert torch.equal(got.to(torch.int64), a.to(torch.int64) @ b.to(torch.int64).T)
    assert be.int_matmul(*_dev(torch.zeros(0, 8, dtype=torch.int8), torch.zeros(5, 8, dtype=torch.int8))).shape == (0, 5)
    with pytest.raises(ValueError, match="int8"):
        be.int_matmul(*_dev(torch.zeros(2, 8), torch.zeros(5, 8, dtype=torch.int8)))


def test_int_matmul_long_k_is_exact_then_overflows_like_the_reference():
    be = TritonBackend(GemmConfig(16, 16, 2048))  # few K-steps: the interpreter is slow
    k = 65536 + 40
    a = torch.full((1, k), -128, dtype=torch.int8)
    b = torch.full((2, k), 127, dtype=torch.int8)
    b[1, ::2] = -128
    got = be.int_matmul(*_dev(a, b)).cpu()
    assert torch.equal(got.to(torch.int64), a.to(torch.int64) @ b.to(torch.int64).T)
    big = torch.full((1, 131072), -128, dtype=torch.int8)  # 2**31: one past int32
    with pytest.raises(OverflowError):
        be.int_matmul(*_dev(big, big))


def test_int8_linear_is_scaled_int_matmul():
    g = torch.Generator().manual_seed(5)
    w = torch.randint(-127, 128, (13, 45), dtype=torch.int8, generator=g)
    s = torch.rand(13, generator=g) * 0.01 + 1e-4
    x = adversarial_rows(10, 45, seed=6).to(torch.bfloat16)
    x_q, x_scale = dynamic_quant_per_token(x)
    be = TritonBackend(SMALL)
    got = be.int8_linear(be.prepare_int8_linear(*_dev(w, s)), *_dev(x_q, x_scale))
    _assert_bitwise(got, scaled_int_matmul(x_q, x_scale, w, s))
    moe = _runtime()
    linear = moe.W8A8Linear(*_dev(w, s), backend=be)
    _assert_bitwise(linear(x.to(DEVICE)), moe.W8A8Linear(w, s, backend="reference")(x))


# ---- the expert path --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "e,h,inter,m,top_k,config",
    [
        (5, 40, 24, 7, 2, SMALL),
        (7, 70, 33, 1, 1, SMALL),     # odd I (scalar-silu tail), H not a multiple of any tile, M = 1
        (3, 18, 13, 0, 2, SMALL),     # M = 0
        (4, 34, 17, 9, 4, None),      # every expert gets every token; default tiles
        (3, 40, 24, 50, 2, GemmConfig(128, 64, 128, 8, 3)),  # the prefill tile shape
    ],
)
def test_grouped_and_combined_forward_match_reference(e, h, inter, m, top_k, config):
    weights = _random_experts(e, h, inter, seed=e + h + inter)
    x = adversarial_rows(m, h, seed=m + 1) if m else torch.zeros(0, h)
    x_q, x_scale = dynamic_quant_per_token(x)
    token_ids, offsets = _routing(_random_ids(m, e, top_k, seed=m), e)
    alpha = torch.linspace(0.05, 1.0, e)
    row_weights = torch.rand(token_ids.numel())
    be = TritonBackend(config)
    prepared = be.prepare(_on_device(weights))
    args = _dev(x_q, x_scale, token_ids, offsets, alpha)
    expect = REFERENCE.grouped_forward(weights, x_q, x_scale, token_ids, offsets, alpha)
    _assert_bitwise(be.grouped_forward(prepared, *args), expect)
    combined = be.combined_forward(prepared, *args, row_weights.to(DEVICE))
    _assert_bitwise(combined, combine_rows(expect, token_ids, row_weights, m))
    _assert_bitwise(combined, REFERENCE.combined_forward(weights, x_q, x_scale, token_ids, offsets, alpha,
                                                         row_weights))


def test_adversarial_rows_extremes_and_determinism():
    e, h, inter = 6, 36, 20
    weights = _random_experts(e, h, inter, seed=3)
    x = adversarial_rows(16, h, seed=5)
    x[3] = 0.0                      # all-zero token
    x[5, 7] = 1e4                   # one outlier
    x_q, x_scale = dynamic_quant_per_token(x)
    x_q[9] = -128                   # the extreme code (dynamic quant never writes it)
    ids = torch.tensor([[1, 4]] * 16)  # experts 0, 2, 3, 5 get nothing; 16 rows each on 1 and 4
    token_ids, offsets = _routing(ids, e)
    row_weights = torch.rand(32)
    be = TritonBackend(SMALL)
    prepared = be.prepare(_on_device(weights))
    args = _dev(x_q, x_scale, token_ids, offsets, torch.ones(e), row_weights)
    first = be.combined_forward(prepared, *args)
    _assert_bitwise(first, REFERENCE.combined_forward(weights, x_q, x_scale, token_ids, offsets, torch.ones(e),
                                                      row_weights))
    _assert_bitwise(be.combined_forward(prepared, *args), first)  # the same bits run to run
    assert bool((first[3].cpu() == 0).all())


def test_bad_inputs_are_named():
    be = TritonBackend(SMALL)
    weights = _random_experts(2, 8, 4, seed=0)
    prepared = be.prepare(_on_device(weights))
    x_q = torch.zeros(2, 8, dtype=torch.int8)
    token_ids, offsets = _routing(torch.tensor([[0], [1]]), 2)
    with pytest.raises(ValueError, match="x_q"):
        be.grouped_forward(prepared, *_dev(torch.zeros(2, 9, dtype=torch.int8), torch.ones(2, 1), token_ids,
                                           offsets, torch.ones(2)))
    with pytest.raises(ValueError, match="alpha"):
        be.grouped_forward(prepared, *_dev(x_q, torch.ones(2, 1), token_ids, offsets, torch.ones(3)))
    if not CUDA:  # value checks run where they cost no synchronisation
        with pytest.raises(ValueError, match="expert_offsets"):
            be.grouped_forward(prepared, x_q, torch.ones(2, 1), token_ids, torch.tensor([0, 2, 1]), torch.ones(2))
    with pytest.raises(ValueError, match="w2"):
        be.prepare(PackedExpertWeights(weights.w13, weights.w13_scale, weights.w2[:, :3], weights.w2_scale))


# ---- the layer and backend choice -------------------------------------------------------------


def test_layer_on_triton_is_the_reference_bit_for_bit():
    W4A8MoE = _runtime().W4A8MoE
    from w4a8moe.formats import MoEModelConfig, quantize_moe_layer
    from w4a8moe.models.synthetic import random_float_moe_layer, tiny_config

    cfg = tiny_config("deepseek_v3")
    mc = MoEModelConfig.from_dict(cfg)
    layer_q = quantize_moe_layer(random_float_moe_layer(cfg, seed=7, alpha=torch.linspace(0.4, 1.0, mc.num_experts)))
    expect_module = W4A8MoE.from_quantized(layer_q, mc.routing, backend="reference")
    got_module = W4A8MoE.from_quantized(layer_q, mc.routing, backend="triton" if not CUDA else None, device=DEVICE)
    assert got_module.backend.name == "triton"
    assert got_module.experts.released  # held once, by the backend, still packed
    x = (torch.randn(5, mc.hidden_size) * 2).to(torch.bfloat16)
    x[0, 3] = 80.0
    _assert_bitwise(got_module(x.to(DEVICE)), expect_module(x))


def test_triton_is_chosen_for_cuda_only():
    assert "triton" not in available_backends("cpu")
    assert get_backend(device="cpu").name != "triton"
    with pytest.raises(ValueError, match="does not run on CUDA"):
        get_backend("cpu", device="cuda")
    if CUDA:
        assert get_backend(device="cuda").name == "triton"
        assert available_backends("cuda")[0] == "triton"


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        TritonBackend().quantize_per_token(torch.ones(2, 4))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import triton.language as tl

    monkeypatch.setattr(tl, "max", object())  # as if triton had been imported with the interpreter off
    with pytest.raises(RuntimeError, match="before triton is first imported"):
        TritonBackend().quantize_per_token(torch.ones(2, 4))


def test_load_model_rejects_cuda_without_a_gpu(capsys):
    _runtime()
    from w4a8moe.cli import main
    from w4a8moe.errors import ConfigError
    from w4a8moe.models.loading import resolve_device

    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
        with pytest.raises(ConfigError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ConfigError):
        resolve_device("tpu")
    if not torch.cuda.is_available():  # the command line says so in one line, exit status 2
        assert main(["generate", "no-such-checkpoint", "--prompt", "a", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


# ---- compiled for a GPU, without one -----------------------------------------------------------

_COMPILE_FOR_HOPPER = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from w4a8moe.kernels import _triton_kernels as K
from w4a8moe.kernels.triton_backend import default_gemm_config

def ptx(fn, sig, consts, **opts):
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(enable_fp_fusion=False, **opts)).asm["ptx"]

gemm = {"a_ptr": "*i8", "a_scale_ptr": "*fp32", "a_row_ptr": "*i64", "w_ptr": "*i8", "w_scale_ptr": "*fp32",
        "out_ptr": "*bf16", "tile_expert_ptr": "*i32", "tile_row_ptr": "*i64", "expert_end_ptr": "*i64",
        "N": "i32", "K": "i32", "stride_a": "i32"}
for name in ("GATHER", "INT4", "RAW_INT32", "BLOCK_M", "BLOCK_P", "BLOCK_K"):
    gemm[name] = "constexpr"
for rows_per_expert in (1, 32, 64, 300):
    c = default_gemm_config(rows_per_expert, 1)
    for gather in (True, False):
        ptx(K.grouped_gemm_kernel, gemm, dict(GATHER=gather, INT4=True, RAW_INT32=False, BLOCK_M=c.block_m,
            BLOCK_P=c.block_p, BLOCK_K=c.block_k), num_warps=c.num_warps, num_stages=c.num_stages)
raw = dict(gemm, out_ptr="*i32")
ptx(K.grouped_gemm_kernel, raw, dict(GATHER=False, INT4=False, RAW_INT32=True, BLOCK_M=64, BLOCK_P=64, BLOCK_K=128),
    num_warps=4, num_stages=3)
q = ptx(K.quantize_rows_kernel, {"x_ptr": "*bf16", "q_ptr": "*i8", "scale_ptr": "*fp32", "K": "i32",
        "BLOCK": "constexpr"}, {"BLOCK": 2048}, num_warps=4)
sw = ptx(K.swiglu_clip_quant_kernel, {"gu_ptr": "*bf16", "alpha_ptr": "*fp32", "row_expert_ptr": "*i64",
         "silu_ptr": "*fp32", "hq_ptr": "*i8", "hscale_ptr": "*fp32", "I": "i32", "scalar_from": "i32",
         "BLOCK": "constexpr"}, {"BLOCK": 1024}, num_warps=4)
co = ptx(K.combine_kernel, {"rows_ptr": "*bf16", "weight_ptr": "*fp32", "token_rows_ptr": "*i64",
         "token_start_ptr": "*i64", "out_ptr": "*fp32", "H": "i32", "BLOCK_H": "constexpr"}, {"BLOCK_H": 1024},
         num_warps=4)
assert "div.rn.f32" in q and "div.rn.f32" in sw, "IEEE division expected"
assert "div.full" not in q + sw and "div.approx" not in q + sw, "approximate division found"
assert "fma.rn.f32" not in co + sw + q, "an FMA would round the weighted sum differently"
print("compiled")
"""


def test_kernels_compile_for_hopper_without_a_gpu():
    # The interpreter accepts code the compiler may not: compile every kernel and tile
    # configuration for sm_90 (Triton ships ptxas) and check the PTX for the rounding the
    # bit-exactness depends on.
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


# ---- CUDA only --------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")


@cuda_only
def test_cuda_int_mm_and_triton_int8_gemm_agree_exactly():
    be = TritonBackend()
    g = torch.Generator().manual_seed(8)
    for m, n, k in [(1, 24, 64), (17, 13, 70), (300, 520, 1030)]:
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        expect = a.to(torch.int64) @ b.to(torch.int64).T
        assert torch.equal(be.int_matmul(a.cuda(), b.cuda()).cpu().to(torch.int64), expect)
        assert torch.equal(be.int_matmul_triton(a.cuda(), b.cuda()).cpu().to(torch.int64), expect)


@cuda_only
@pytest.mark.parametrize("rows_per_expert", [1, 40, 300])
def test_cuda_default_tiles_at_larger_shapes(rows_per_expert):
    # The decode and prefill tile configurations (wgmma on Hopper) against the CPU reference.
    e, h, inter, top_k = 8, 512, 256, 2
    m = rows_per_expert * e // top_k
    weights = _random_experts(e, h, inter, seed=rows_per_expert)
    x = adversarial_rows(m, h, seed=9).to(torch.bfloat16)
    x_q, x_scale = dynamic_quant_per_token(x)
    token_ids, offsets = _routing(_random_ids(m, e, top_k, seed=1), e)
    alpha = torch.linspace(0.3, 1.0, e)
    row_weights = torch.rand(token_ids.numel())
    be = TritonBackend()
    got = be.combined_forward(be.prepare(_on_device(weights)), *_dev(x_q, x_scale, token_ids, offsets, alpha,
                                                                     row_weights))
    expect = REFERENCE.combined_forward(weights, x_q, x_scale, token_ids, offsets, alpha, row_weights)
    # Bit-identical, except where torch ran the reference's silu rows in several thread chunks
    # (its scalar-tail columns then fall inside rows): count those and bound them.
    diff = _differences(got, expect)
    assert int(diff.sum()) <= diff.numel() // 100, int(diff.sum())
    finite = torch.isfinite(expect)
    scale = float(expect[finite].abs().max())
    close = torch.isclose(got.cpu(), expect, rtol=2e-2, atol=1e-3 * scale, equal_nan=True)
    assert bool(close.all())


@cuda_only
def test_cuda_load_model_and_generate(tmp_path):
    W4A8MoE = _runtime().W4A8MoE
    from tests.test_models_loading import make_source
    from w4a8moe.models.command import generate_text
    from w4a8moe.models.export import export_w4a8_checkpoint
    from w4a8moe.models.loading import load_model

    source, cfg = make_source("deepseek_v3")
    export_w4a8_checkpoint(source, cfg, tmp_path / "q")
    cpu_model = load_model(tmp_path / "q", backend="reference")
    gpu_model = load_model(tmp_path / "q", device="cuda")
    blocks_cpu = [m for m in cpu_model.modules() if isinstance(m, W4A8MoE)]
    blocks_gpu = [m for m in gpu_model.modules() if isinstance(m, W4A8MoE)]
    assert blocks_gpu and all(b.backend.name == "triton" for b in blocks_gpu)
    x = (torch.randn(6, blocks_cpu[0].experts.hidden_size) * 2).to(torch.bfloat16)
    for a, b in zip(blocks_cpu, blocks_gpu):
        # The router's fp32 matmul may round differently on the GPU: give both the CPU's routing.
        weights, ids = a.route(x)
        _assert_bitwise(b.routed_experts(x.cuda(), weights.cuda(), ids.cuda()), a.routed_experts(x, weights, ids))
    text = generate_text(tmp_path / "q", "ab", max_new_tokens=4, stream=False, model=gpu_model)
    assert isinstance(text, str)


def test_padded_int_mm_is_exact_on_every_shape_rule():
    # The one padding rule of both CUDA paths (K, N to multiples of 8; more than 16 rows), run
    # here through torch._int_mm on the CPU: zero padding must not change a product.
    from w4a8moe.kernels.cuda_int_mm import int_mm_padded, pad_weight_for_int_mm

    g = torch.Generator().manual_seed(9)
    for m, n, k in [(0, 8, 16), (1, 24, 64), (5, 13, 70), (16, 8, 8), (17, 13, 70), (40, 3, 1)]:
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        a[:1] = -128  # the extreme row
        expect = a.to(torch.int64) @ b.to(torch.int64).T
        padded = pad_weight_for_int_mm(b)
        assert (padded is None) == (n % 8 == 0 and k % 8 == 0)
        for kept in (None, padded):
            out = int_mm_padded(a, b, kept)
            assert out.dtype == torch.int32 and out.shape == (m, n)
            assert torch.equal(out.to(torch.int64), expect)
