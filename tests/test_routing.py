"""Routing (SPEC 3): the native kernel's expert choice and row sort against the torch
definition and an independent per-token reference, on random and adversarial scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from w4a8moe.formats.model_config import RoutingConfig
from w4a8moe.kernels.cpu import cpu_backend_factory
from w4a8moe.moe import grouped_top_k, route, sort_rows_by_expert

CPU = cpu_backend_factory()  # None (after one warning) where the kernel cannot be built
needs_kernel = pytest.mark.skipif(CPU is None, reason="the native CPU kernel cannot be built here")

# (experts, top_k, n_group, topk_group): DeepSeek-V3's, smaller grouped ones (groups of 3 and 1),
# and ungrouped (softmax top-k and sigmoid without groups).
SHAPES = [(256, 8, 8, 4), (64, 6, 8, 3), (6, 2, 2, 1), (8, 3, 8, 5), (60, 4, 1, 1), (128, 8, 1, 1)]


def reference_choice(scores: np.ndarray, bias: np.ndarray | None, top_k: int, n_group: int, topk_group: int):
    """One token at a time in fp32: rank by (value descending, NaN first, index ascending)."""
    m, e = scores.shape
    per = e // n_group
    weights = np.zeros((m, top_k), dtype=np.float32)
    ids = np.zeros((m, top_k), dtype=np.int64)

    def ranked(values, indices):
        return sorted(indices, key=lambda i: (0 if np.isnan(values[i]) else 1,
                                              0.0 if np.isnan(values[i]) else -float(values[i]), i))

    for t in range(m):
        s = scores[t]
        sb = s if bias is None else (s + bias).astype(np.float32)
        candidates = list(range(e))
        if n_group > 1:
            group_score = {}
            for g in range(n_group):
                best = ranked(sb, list(range(g * per, (g + 1) * per)))[:2]
                group_score[g] = np.float32(sb[best[0]] + sb[best[1]]) if per > 1 else sb[best[0]]
            keep = ranked(group_score, list(range(n_group)))[:topk_group]
            candidates = [j for g in sorted(keep) for j in range(g * per, (g + 1) * per)]
        chosen = ranked(sb, candidates)[:top_k]
        ids[t] = chosen
        weights[t] = s[chosen]
    return weights, ids


def adversarial_scores(e: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rand = torch.sigmoid(torch.randn(37, e, generator=g) * 2)
    bias = torch.randn(e, generator=g) * 0.05
    ties = torch.full((5, e), 0.5)
    steps = (torch.arange(e) % 3).float().repeat(4, 1) / 4  # equal values within and across groups
    zeros = torch.zeros(3, e)
    signed_zero = torch.zeros(2, e)
    signed_zero[:, ::2] = -0.0
    outlier = rand[:4].clone()
    outlier[:, e // 2] = 1e30
    nan_row = rand[:3].clone()
    nan_row[0, e - 1] = float("nan")
    nan_row[1, :] = float("nan")
    return {
        "random": (rand, bias), "random-no-bias": (rand, None), "ties": (ties, torch.zeros(e)),
        "ties-bias": (ties, bias), "steps": (steps, None), "zeros": (zeros, torch.zeros(e)),
        "signed-zero": (signed_zero, torch.zeros(e)), "outlier": (outlier, bias), "one-token": (rand[:1], bias),
        "no-tokens": (rand[:0], bias), "nan": (nan_row, bias),
    }


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "e{}k{}g{}of{}".format(*s))
def test_torch_choice_matches_independent_reference(shape):
    e, k, n_group, topk_group = shape
    for name, (scores, bias) in adversarial_scores(e, seed=e).items():
        if name == "nan":
            continue  # the reference's NaN ranking is checked on the kernel below, against torch
        w, ids = grouped_top_k(scores, bias, k, n_group, topk_group)
        rw, rids = reference_choice(scores.numpy(), None if bias is None else bias.numpy(), k, n_group, topk_group)
        assert np.array_equal(ids.numpy(), rids), name
        assert np.array_equal(w.numpy().view(np.int32), rw.view(np.int32)), name


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "e{}k{}g{}of{}".format(*s))
def test_native_choice_is_torch_bit_for_bit(shape):
    e, k, n_group, topk_group = shape
    for name, (scores, bias) in adversarial_scores(e, seed=e + 1).items():
        w, ids = grouped_top_k(scores, bias, k, n_group, topk_group)
        nw, nids = grouped_top_k(scores, bias, k, n_group, topk_group, backend=CPU)
        assert torch.equal(nids, ids), name
        assert torch.equal(nw.view(torch.int32), w.view(torch.int32)), name


@needs_kernel
@pytest.mark.parametrize("method", ["noaux_tc", "softmax"])
def test_native_route_is_torch_bit_for_bit(method):
    g = torch.Generator().manual_seed(3)
    grouped = method == "noaux_tc"
    cfg = RoutingConfig(method, 64, 6, n_group=8 if grouped else 1, topk_group=3 if grouped else 1,
                        routed_scaling_factor=2.5)
    router = torch.randn(64, 96, generator=g) * 0.1
    bias = torch.randn(64, generator=g) * 0.01 if grouped else None
    for m in (0, 1, 5, 200):
        x = torch.randn(m, 96, generator=g).to(torch.bfloat16)
        w, ids = route(x, router, cfg, bias)
        nw, nids = route(x, router, cfg, bias, backend=CPU)
        assert torch.equal(nids, ids) and torch.equal(nw.view(torch.int32), w.view(torch.int32)), m


def reference_sort(ids: np.ndarray, e: int, weights: np.ndarray):
    flat = ids.reshape(-1)
    order = sorted(range(flat.size), key=lambda i: (flat[i], i))
    counts = np.bincount(flat, minlength=e) if flat.size else np.zeros(e, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    k = ids.shape[1]
    return np.array(order, dtype=np.int64), np.array(order, dtype=np.int64) // k, offsets, weights.reshape(-1)[order]


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=needs_kernel)], ids=["torch", "native"])
def test_sort_rows_matches_reference(native):
    g = torch.Generator().manual_seed(9)
    cases = {
        "random": torch.randint(0, 16, (50, 4), generator=g),
        "empty-experts": torch.randint(3, 5, (20, 2), generator=g),  # experts 0-2 and 5-15 get no row
        "one-token": torch.tensor([[15, 0, 7]]),
        "no-tokens": torch.zeros((0, 3), dtype=torch.int64),
        "one-slot": torch.randint(0, 16, (9, 1), generator=g),
        "all-one-expert": torch.full((7, 2), 6),
    }
    for name, ids in cases.items():
        weights = torch.rand(ids.shape, generator=g)
        rows = sort_rows_by_expert(ids, 16, weights, backend=CPU if native else None)
        order, tokens, offsets, row_weights = reference_sort(ids.numpy(), 16, weights.numpy())
        assert np.array_equal(rows.order.numpy(), order), name
        assert np.array_equal(rows.token_ids.numpy(), tokens), name
        assert np.array_equal(rows.offsets.numpy(), offsets), name
        assert np.array_equal(rows.row_weights.numpy(), row_weights), name
        assert sort_rows_by_expert(ids, 16, backend=CPU if native else None).row_weights is None


@needs_kernel
def test_native_sort_rejects_out_of_range_ids():
    from w4a8moe.kernels.cpu import KernelCallError

    with pytest.raises(KernelCallError, match="expert id is out of range"):
        CPU.sort_rows(torch.tensor([[0, 16]]), 16)
    with pytest.raises(KernelCallError, match="expert id is out of range"):
        CPU.sort_rows(torch.tensor([[-1, 3]]), 16)


@needs_kernel
def test_native_choice_rejects_bad_arguments():
    from w4a8moe.kernels.cpu import KernelCallError

    with pytest.raises(KernelCallError, match="invalid routing arguments"):
        CPU.select_experts(torch.rand(2, 8), None, top_k=5, n_group=4, topk_group=2)  # 5 > 2 groups x 2
