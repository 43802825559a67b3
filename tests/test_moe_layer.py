"""Routing and the W4A8 MoE layer against the independent numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.reference import spec_numpy as ref
from w4a8moe.formats import RoutingConfig, quantize_moe_layer
from w4a8moe.kernels import PackedExpertWeights
from w4a8moe.kernels.reference import ReferenceBackend
from w4a8moe.models.synthetic import random_float_moe_layer, tiny_config
from w4a8moe.moe import W4A8MoE, route_noaux_tc, route_softmax_topk
from w4a8moe.quant import unpack_int4_pairs


def test_noaux_tc_matches_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 16, generator=g) * 2
    bias = torch.randn(16, generator=g) * 0.3
    w, ids = route_noaux_tc(logits, bias, top_k=4, n_group=4, topk_group=2)
    rw, rids = ref.route_noaux_tc(logits.numpy(), bias.numpy(), 4, 4, 2)
    assert np.array_equal(np.sort(ids.numpy(), 1), np.sort(rids, 1))
    order = np.argsort(ids.numpy(), 1), np.argsort(rids, 1)
    assert np.allclose(np.take_along_axis(w.numpy(), order[0], 1), np.take_along_axis(rw, order[1], 1), atol=1e-6)


def test_noaux_tc_weights_are_unbiased_scores_and_groups_respected():
    logits = torch.zeros(1, 8)
    logits[0, 0] = 5.0  # best score, but its group is killed by the bias on the others
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 3.0, 3.0, 0.0, 0.0])
    w, ids = route_noaux_tc(logits, bias, top_k=2, n_group=4, topk_group=1, norm_topk_prob=False)
    assert sorted(ids[0].tolist()) == [4, 5]  # group 2 wins on biased scores
    assert torch.allclose(w[0], torch.sigmoid(torch.zeros(2)))  # weights are the unbiased sigmoid


def test_softmax_topk_matches_reference():
    logits = torch.randn(30, 8)
    for norm in (True, False):
        w, ids = route_softmax_topk(logits, 2, norm)
        rw, rids = ref.route_softmax(logits.numpy(), 2, norm)
        assert np.array_equal(ids.numpy(), rids)
        assert np.allclose(w.numpy(), rw, atol=1e-6)


def test_routing_config_validation():
    with pytest.raises(ValueError):
        RoutingConfig("noaux_tc", 10, 2, n_group=4)
    with pytest.raises(ValueError):
        RoutingConfig("softmax", 4, 5)
    with pytest.raises(ValueError):
        RoutingConfig("bogus", 4, 2)


def _reference_forward(layer_q, routing: RoutingConfig, x: torch.Tensor, apply_alpha: bool = True) -> np.ndarray:
    experts = []
    for e in range(layer_q.num_experts):
        q13 = np.concatenate([unpack_int4_pairs(layer_q.packed["gate"][e]).numpy(),
                              unpack_int4_pairs(layer_q.packed["up"][e]).numpy()])
        s13 = np.concatenate([layer_q.scale["gate"][e].numpy(), layer_q.scale["up"][e].numpy()])
        experts.append({"q13": q13, "s13": s13, "q2": unpack_int4_pairs(layer_q.packed["down"][e]).numpy(),
                        "s2": layer_q.scale["down"][e].numpy()})
    shared = None
    if layer_q.shared is not None:
        shared = {p: (w.numpy(), s.numpy()) for p, (w, s) in layer_q.shared.items()}
    alpha = layer_q.alpha.numpy() if apply_alpha else np.ones(layer_q.num_experts, np.float32)
    routing_d = {"method": routing.method, "top_k": routing.top_k, "n_group": routing.n_group,
                 "topk_group": routing.topk_group, "norm": routing.norm_topk_prob,
                 "scale": routing.routed_scaling_factor}
    bias = None if layer_q.correction_bias is None else layer_q.correction_bias.numpy().astype(np.float64)
    gate = None if layer_q.shared_expert_gate is None else layer_q.shared_expert_gate.float().numpy()
    return ref.moe_forward(x.float().numpy(), layer_q.router_weight.float().numpy(), routing_d, experts, alpha,
                           shared, bias, gate)


def _assert_close_bf16(y: torch.Tensor, expect: np.ndarray) -> None:
    # Tolerance: the routed sum is accumulated in another order (fp32) and silu may differ
    # in its last ulp, which can move a rare activation code by one: a few elements may
    # differ by a bf16 ulp or a fraction of a percent. A wrong scale, alpha, nibble or
    # routing decision moves many elements by far more.
    yf = y.float().numpy()
    scale = np.abs(expect).max() + 1e-30
    diff = np.abs(yf - expect)
    assert diff.max() <= 5e-3 * scale, diff.max() / scale
    assert (diff > 0).mean() <= 0.01


@pytest.mark.parametrize("model_type", ["deepseek_v3", "qwen2_moe", "mixtral", "olmoe"])
@pytest.mark.parametrize("m", [1, 5, 37])
def test_layer_matches_reference(model_type, m):
    cfg = tiny_config(model_type)
    from w4a8moe.formats import MoEModelConfig

    mc = MoEModelConfig.from_dict(cfg)
    alpha = torch.linspace(0.4, 1.0, mc.num_experts)
    layer_q = quantize_moe_layer(random_float_moe_layer(cfg, seed=m, alpha=alpha))
    module = W4A8MoE.from_quantized(layer_q, mc.routing, backend="reference")
    x = (torch.randn(m, mc.hidden_size) * 2).to(torch.bfloat16)
    x[0, 3] = 80.0  # an outlier activation
    _assert_close_bf16(module(x), _reference_forward(layer_q, mc.routing, x))
    module.apply_alpha = False
    _assert_close_bf16(module(x), _reference_forward(layer_q, mc.routing, x, apply_alpha=False))


def test_alpha_changes_output_and_alpha_one_equals_ignoring_it():
    cfg = tiny_config("deepseek_v3")
    from w4a8moe.formats import MoEModelConfig

    mc = MoEModelConfig.from_dict(cfg)
    x = torch.randn(16, mc.hidden_size).to(torch.bfloat16)
    clipped = quantize_moe_layer(random_float_moe_layer(cfg, seed=1, alpha=torch.full((mc.num_experts,), 0.3)))
    ones = quantize_moe_layer(random_float_moe_layer(cfg, seed=1))
    a = W4A8MoE.from_quantized(clipped, mc.routing, backend="reference")
    b = W4A8MoE.from_quantized(clipped, mc.routing, apply_alpha=False, backend="reference")
    c = W4A8MoE.from_quantized(ones, mc.routing, backend="reference")
    assert not torch.equal(a(x), b(x))
    assert torch.equal(b(x), c(x))


def test_zero_tokens_empty_experts_and_shape():
    cfg = tiny_config("deepseek_v3")
    from w4a8moe.formats import MoEModelConfig

    mc = MoEModelConfig.from_dict(cfg)
    layer_q = quantize_moe_layer(random_float_moe_layer(cfg, seed=2))
    module = W4A8MoE.from_quantized(layer_q, mc.routing, backend="reference")
    assert module(torch.zeros(0, mc.hidden_size, dtype=torch.bfloat16)).shape == (0, mc.hidden_size)
    x = torch.randn(2, 3, mc.hidden_size).to(torch.bfloat16)  # 6 tokens x top-4: most experts get none
    y = module(x)
    assert y.shape == x.shape and y.dtype == torch.bfloat16 and bool(torch.isfinite(y.float()).all())
    _, ids = module.route(x.reshape(-1, mc.hidden_size)[:1])
    assert len(set(ids.flatten().tolist())) < mc.num_experts  # one token leaves experts empty
    assert torch.equal(module(x.reshape(-1, mc.hidden_size)[:1]), y.reshape(-1, mc.hidden_size)[:1])
    zero = module(torch.zeros(3, mc.hidden_size, dtype=torch.bfloat16))
    assert bool((zero == 0).all())  # zero tokens quantize to zero everywhere, shared expert included


def test_weights_stay_packed():
    cfg = tiny_config("deepseek_v3")
    from w4a8moe.formats import MoEModelConfig

    mc = MoEModelConfig.from_dict(cfg)
    module = W4A8MoE.from_quantized(quantize_moe_layer(random_float_moe_layer(cfg)), mc.routing, backend="reference")
    e, h, i = mc.num_experts, mc.hidden_size, mc.moe_intermediate_size
    int8_bytes = sum(b.numel() for b in module.experts.buffers() if b.dtype == torch.int8)
    assert int8_bytes == e * 3 * h * i // 2  # 4 bits per routed weight, nothing unpacked kept
    assert all(b.dtype != torch.bfloat16 for b in module.experts.buffers())


@pytest.mark.parametrize("fmt", ["compressed-tensors", "ascendv1"])
def test_odd_sizes_through_a_checkpoint(tmp_path, fmt):
    from w4a8moe import open_checkpoint, write_checkpoint

    # 5 experts, top-3, H and I even but not multiples of any block (AscendV1 needs I % 16 == 0)
    inter = 48 if fmt == "ascendv1" else 18
    cfg = tiny_config("mixtral", hidden_size=34, intermediate_size=inter, num_local_experts=5, num_experts_per_tok=3)
    float_layer = random_float_moe_layer(cfg, seed=9, alpha=torch.tensor([0.3, 0.5, 0.7, 0.9, 1.0]))
    ckpt = open_checkpoint(write_checkpoint(tmp_path / fmt, cfg, {0: float_layer}, fmt))
    module = ckpt.moe_layer(0, backend="reference")
    x = (torch.randn(11, 34) * 3).to(torch.bfloat16)
    _assert_close_bf16(module(x), _reference_forward(ckpt.load_moe_layer_tensors(0), ckpt.model_config.routing, x))


class _RelayingBackend(ReferenceBackend):
    """A backend that keeps its own copy of the weights, as the native CPU kernel does."""

    name = "relaying"

    def prepare(self, weights):
        return {"copy": PackedExpertWeights(weights.w13.clone(), weights.w13_scale, weights.w2.clone(),
                                            weights.w2_scale)}

    def grouped_forward(self, prepared, *args):
        return super().grouped_forward(prepared["copy"], *args)


def test_relaid_weights_are_held_once():
    cfg = tiny_config("deepseek_v3")
    from w4a8moe.formats import MoEModelConfig

    mc = MoEModelConfig.from_dict(cfg)
    layer_q = quantize_moe_layer(random_float_moe_layer(cfg, seed=4))
    x = torch.randn(7, mc.hidden_size).to(torch.bfloat16)
    expect = W4A8MoE.from_quantized(layer_q, mc.routing, backend="reference")(x)
    module = W4A8MoE.from_quantized(layer_q, mc.routing, backend=_RelayingBackend())
    assert module.experts.released and module.experts.w13 is None
    assert "experts.w13" not in module.state_dict()
    assert torch.equal(module(x), expect)
    with pytest.raises(RuntimeError, match="released"):
        module.set_backend("reference")
    kept = W4A8MoE.from_quantized(layer_q, mc.routing, backend=_RelayingBackend(), keep_packed=True)
    kept.set_backend("reference")
    assert torch.equal(kept(x), expect)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("m", [0, 1, 5])
def test_gated_mlp_stacks_w8a8_gate_and_up_with_the_same_bits(backend, m):
    """The stacked gate|up projection gives the bits of the two projections run apart."""
    from w4a8moe.moe import GatedMLP, W8A8Linear
    from w4a8moe.quant import silu_and_mul

    if backend == "cpu":
        from tests.conftest import cpu_backend_or_skip

        cpu_backend_or_skip()
    g = torch.Generator().manual_seed(m)

    def w8a8(n: int, k: int) -> W8A8Linear:
        return W8A8Linear(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g),
                          torch.rand(n, generator=g) * 1e-2 + 1e-4, backend=backend)

    gate, up, down = w8a8(37, 70), w8a8(37, 70), w8a8(70, 37)
    x = torch.randn(m, 70, generator=g).to(torch.bfloat16)
    x[:, 3] = 40.0  # an outlier column: per-token scales far from the typical row
    mlp = GatedMLP(gate, up, down)
    assert mlp.gate_up_proj is not None and mlp.gate_proj is None and mlp.up_proj is None
    expect = down(silu_and_mul(gate(x), up(x)))
    assert torch.equal(mlp(x).view(torch.int16), expect.view(torch.int16))
    # A bf16 projection among them: nothing is stacked.
    float_up = torch.nn.Linear(70, 37, bias=False, dtype=torch.bfloat16)
    assert GatedMLP(gate, float_up, down).gate_up_proj is None
