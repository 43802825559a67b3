"""The tensor-parallel split of the expert path and of a row-parallel W8A8 Linear (SPEC 7b).

Ranks are simulated by threads that exchange their tensors through a barrier, so the
reductions are real (every rank sees only its own share until the reducer returns). The
claim tested is bitwise: each rank's result equals the unsplit computation, on both
backends; and, so that the test has teeth, a rank that quantized against its *local* max
gets different bits.
"""

from __future__ import annotations

import threading

import pytest
import torch

from tests.conftest import adversarial_rows
from w4a8moe.kernels.base import PackedExpertWeights, get_backend
from w4a8moe.kernels.reference import ReferenceBackend
from w4a8moe.kernels.split import split_expert_rows, split_int8_linear
from w4a8moe.quant import dynamic_quant_per_token, pack_int4_pairs, quantize_int8_per_channel, w8a8_linear


class SimulatedGroup:
    """``world`` ranks in threads; ``reducer(rank, op)`` gives a rank's all-reduce."""

    def __init__(self, world: int):
        self.world = world
        self.slots: list[torch.Tensor | None] = [None] * world
        self.barrier = threading.Barrier(world)

    def reducer(self, rank: int, op: str):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            stacked = torch.stack([s for s in self.slots])
            out = stacked.amax(0) if op == "max" else stacked.sum(0, dtype=t.dtype)
            self.barrier.wait()
            return out
        return reduce

    def run(self, fn):
        results: list[object] = [None] * self.world
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = fn(rank)
            except BaseException as exc:  # re-raised in the main thread below
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, except that any two NaNs match (the C kernel and torch spell NaN with
    different sign bits; an adversarial row scaled by 1e30 overflows to inf, then NaN)."""
    same = a.view(torch.int16) == b.view(torch.int16)
    return bool((same | (torch.isnan(a) & torch.isnan(b))).all())


def _backends() -> list[str]:
    names = ["reference"]
    try:
        get_backend("cpu")
        names.append("cpu")
    except RuntimeError:
        pass
    return names


def _experts(e: int, h: int, inter: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randint(-7, 8, (e, 2 * inter, h), dtype=torch.int8, generator=g)
    w2 = torch.randint(-7, 8, (e, h, inter), dtype=torch.int8, generator=g)
    return w13, torch.rand(e, 2 * inter, generator=g) * 0.02 + 1e-4, w2, torch.rand(e, h, generator=g) * 0.02 + 1e-4


def _rank_share(w13, s13, w2, rank: int, world: int) -> PackedExpertWeights:
    """Rank ``rank``'s I-columns of every expert, as vLLM's loader narrows them."""
    inter = w2.shape[2]
    step = inter // world
    cols = slice(rank * step, (rank + 1) * step)
    gate, up = w13[:, :inter], w13[:, inter:]
    return PackedExpertWeights(
        pack_int4_pairs(torch.cat((gate[:, cols], up[:, cols]), 1)),
        torch.cat((s13[:, :inter][:, cols], s13[:, inter:][:, cols]), 1),
        pack_int4_pairs(w2[:, :, cols].contiguous()),
        torch.ones(w2.shape[0], w2.shape[1]),  # unused by the split path
    )


def _routing(m: int, e: int, top_k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e - 1, generator=g)[:top_k] for _ in range(m)])  # expert e-1 stays empty
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offsets = torch.zeros(e + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.bincount(flat, minlength=e), 0)
    return torch.div(order, top_k, rounding_mode="floor"), offsets


@pytest.mark.parametrize("backend_name", _backends())
@pytest.mark.parametrize("world,e,h,inter,m,top_k", [(2, 5, 64, 128, 11, 2), (2, 4, 96, 64, 1, 3), (4, 3, 32, 256, 6, 2)])
def test_split_expert_rows_equal_the_unsplit_path(backend_name, world, e, h, inter, m, top_k):
    torch.set_num_threads(1)  # torch's own silu split points depend on its thread count
    w13, s13, w2, s2 = _experts(e, h, inter, seed=e * h + inter)
    x = adversarial_rows(m, h, seed=m)
    x_q, x_scale = dynamic_quant_per_token(x)
    token_ids, offsets = _routing(m, e, top_k, seed=m + top_k)
    alpha = torch.linspace(0.2, 1.0, e)
    backend = get_backend(backend_name)
    whole = PackedExpertWeights(pack_int4_pairs(w13), s13, pack_int4_pairs(w2), s2)
    expect = backend.grouped_forward(backend.prepare(whole), x_q, x_scale, token_ids, offsets, alpha)
    group = SimulatedGroup(world)
    shares = [backend.prepare(_rank_share(w13, s13, w2, r, world)) for r in range(world)]

    def rank_fn(rank: int) -> torch.Tensor:
        return split_expert_rows(backend, shares[rank], s2, x_q, x_scale, token_ids, offsets, alpha,
                                 group.reducer(rank, "max"), group.reducer(rank, "sum"))

    for got in group.run(rank_fn):
        assert _same_bits(got, expect)

    # Teeth: agreeing on the sum but quantizing against each rank's local max differs.
    local = SimulatedGroup(world)

    def local_max_fn(rank: int) -> torch.Tensor:
        return split_expert_rows(backend, shares[rank], s2, x_q, x_scale, token_ids, offsets, alpha,
                                 lambda t: t, local.reducer(rank, "sum"))

    assert not _same_bits(local.run(local_max_fn)[0], expect)


@pytest.mark.parametrize("backend_name", _backends())
@pytest.mark.parametrize("world,n,k,m", [(2, 48, 128, 9), (2, 16, 64, 1), (4, 40, 256, 5)])
def test_split_int8_linear_equals_the_unsplit_linear(backend_name, world, n, k, m):
    g = torch.Generator().manual_seed(n + k)
    w_q, w_s = quantize_int8_per_channel(torch.randn(n, k, generator=g))
    x = adversarial_rows(m, k, seed=k).to(torch.bfloat16)
    expect = w8a8_linear(x, w_q, w_s)
    backend = get_backend(backend_name)
    step = k // world
    shares = [backend.prepare_int8_linear(w_q[:, r * step:(r + 1) * step].contiguous(), w_s) for r in range(world)]
    group = SimulatedGroup(world)

    def rank_fn(rank: int) -> torch.Tensor:
        return split_int8_linear(backend, shares[rank], w_s, x[:, rank * step:(rank + 1) * step],
                                 group.reducer(rank, "max"), group.reducer(rank, "sum"))

    for got in group.run(rank_fn):
        assert _same_bits(got, expect)


def test_gate_up_and_down_entries_match_between_backends():
    if "cpu" not in _backends():
        pytest.skip("the CPU kernel cannot be built here")
    w13, s13, w2, s2 = _experts(6, 64, 96, seed=3)
    whole = PackedExpertWeights(pack_int4_pairs(w13), s13, pack_int4_pairs(w2), s2)
    x_q, x_scale = dynamic_quant_per_token(adversarial_rows(10, 64, seed=2))
    token_ids, offsets = _routing(10, 6, 3, seed=1)
    ref, cpu = ReferenceBackend(), get_backend("cpu")
    pr, pc = ref.prepare(whole), cpu.prepare(whole)
    gu_ref = ref.gate_up_rows(pr, x_q, x_scale, token_ids, offsets)
    assert _same_bits(gu_ref, cpu.gate_up_rows(pc, x_q, x_scale, token_ids, offsets))
    h_q = torch.randint(-128, 128, (token_ids.numel(), 96), dtype=torch.int8)
    assert torch.equal(ref.down_rows_int32(pr, h_q, offsets), cpu.down_rows_int32(pc, h_q, offsets))
    w_q, w_s = quantize_int8_per_channel(torch.randn(24, 64))
    assert torch.equal(ref.int8_linear_int32(ref.prepare_int8_linear(w_q, w_s), x_q),
                       cpu.int8_linear_int32(cpu.prepare_int8_linear(w_q, w_s), x_q))
