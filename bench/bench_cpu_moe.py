"""Benchmark: the native CPU W4A8 expert path against torch baselines, with machine probes.

Run ``python bench/bench_cpu_moe.py`` (``--quick`` for a short run). In one run it measures

* the machine's DRAM read bandwidth (a read probe over a buffer larger than 1 GB, so not the
  cache) and its int8 dot-product throughput (a register-only ``vpdpbusd`` probe);
* the routed-expert path of one MoE layer with DeepSeek-V3 expert shapes (H=7168, I=2048;
  32 experts, top-8) at M = 1, 8, 64, 512 tokens for
  - ``w4a8-cpu``: this package's native kernel (``get_backend("cpu")``);
  - ``bf16`` / ``fp32``: torch matmuls on the dequantized weights, unquantized activations;
  - ``w8a8-int_mm``: ``torch._int_mm`` on the same integer weights held as int8, per-token int8
    activations, the same SwiGLU-clip-quant between the two GEMMs;
  - ``int4pack``: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (int4 weights, bf16
    activations, per-channel scales repeated over groups of 256);
  - ``reference``: this package's exact torch backend (small M only, it is slow);
* and what the layer calls, the expert path plus each token's weighted sum of its rows: the
  kernel's fused sum (``combined_forward``) against the kernel's rows summed by torch;
* the whole ``W4A8MoE`` block (routing, routed experts, W8A8 shared expert) on fresh inputs at
  M = 1 and 512, back to back and right after the bf16 torch work of a DeepSeek-V3 decoder
  layer (MLA attention, norms), as a model runs it, against the targets: interleaved M=1
  within 1.25x of alone and at >= 85 % of the bandwidth floor (paired: after each call, the
  read probe reads as many cold bytes as the call did, and the median over calls of probe time /
  call time is the fraction), interleaved M=512 no slower;
  without ``--quick`` (or with ``--wait-policies``) that part again under each
  ``OMP_WAIT_POLICY``, one process each (``--block-only`` runs only that part).

Decode runs (M = 1, 8) rotate over several copies of the expert set (layers) and over disjoint
routings, so that every timed call reads its weights from DRAM, not from the cache. All
implementations get the same routed rows; routing itself is not timed. The table gives best
and median time per call over the repeats, the speed-up of the native kernel over each
baseline, effective GB/s of packed int4 weight bytes (decode) and TOP/s (prefill), each as a
fraction of the probes. Each target line also gives the lowest ratio the probes allow (all
bytes at the measured DRAM bandwidth, all multiply-adds at the measured int8 peak), so a
target that this machine cannot reach shows as such. ``os.getloadavg()`` is printed before
and after: the figures are only as good as the machine was quiet.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from w4a8moe.formats import RoutingConfig
from w4a8moe.kernels import PackedExpertWeights, combine_rows, get_backend
from w4a8moe.moe import PackedExperts, SharedExpert, W4A8MoE, W8A8Linear
from w4a8moe.quant import dynamic_quant_per_token, swiglu_clip_quant, unpack_int4_pairs

HIDDEN, INTER, EXPERTS, TOP_K = 7168, 2048, 32, 8
GIB = 1024**3


# ---- probes ---------------------------------------------------------------------------------


def probe_dram_read(kernel, size_bytes: int, repeats: int) -> dict[str, float]:
    """Best GB/s reading a ``size_bytes`` buffer: the C probe (1 and all threads, with and
    without software prefetch; on ordinary pages and, ``-huge``, on the transparent huge pages
    the kernel's weights live on) and a torch reduction."""
    threads = torch.get_num_threads()
    results: dict[str, float] = {}
    # One buffer at a time (each is the probe's whole size).
    for pages, make in (("", lambda: torch.randint(0, 256, (size_bytes,), dtype=torch.uint8)),
                        ("-huge", lambda: random_weight_buffer(size_bytes))):
        buf = make()
        for label, nthreads, prefetch in (("c-1thr", 1, 0), ("c-1thr-prefetch", 1, 1),
                                          (f"c-{threads}thr", threads, 0), (f"c-{threads}thr-prefetch", threads, 1)):
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                kernel.lib.w4a8_probe_read(buf.data_ptr(), size_bytes, prefetch, nthreads)
                best = min(best, time.perf_counter() - start)
            results[label + pages] = size_bytes / best / 1e9
        if not pages:
            as_int64 = buf.view(torch.int64)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                as_int64.sum()
                best = min(best, time.perf_counter() - start)
            results["torch-sum"] = size_bytes / best / 1e9
            del as_int64
        del buf
    return results


def random_weight_buffer(nbytes: int) -> torch.Tensor:
    """Random bytes in the kind of memory the kernel's weights live in
    (:func:`w4a8moe.kernels.cpu.weight_buffer`: transparent huge pages where the OS has them),
    so that a probe over it times the same pages the kernel streams."""
    from w4a8moe.kernels.cpu import weight_buffer

    return weight_buffer(nbytes).random_(0, 256)


def best_read_variant(dram: dict[str, float]) -> tuple[int, int, bool]:
    """``(prefetch, threads, huge pages)`` of the C read probe's fastest variant in ``dram``
    (labels ``c-<n>thr[-prefetch][-huge]`` of :func:`probe_dram_read`)."""
    label = max((k for k in dram if k.startswith("c-")), key=lambda k: dram[k])
    return int("-prefetch" in label), int(label.split("-")[1].removesuffix("thr")), label.endswith("-huge")


def probe_int8_dot(kernel, repeats: int) -> dict[str, float]:
    """Best TOP/s of register-only u8 x s8 dot products (1 and all threads), and torch._int_mm."""
    results: dict[str, float] = {}
    threads = torch.get_num_threads()
    for label, nthreads in (("vnni-1thr", 1), (f"vnni-{threads}thr", threads)):
        best = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            macs = kernel.lib.w4a8_probe_int8_dot(32 * nthreads, 100_000, nthreads)
            best = max(best, 2 * macs / (time.perf_counter() - start) / 1e12)
        results[label] = best
    a = torch.randint(-127, 128, (512, 2048), dtype=torch.int8)
    b = torch.randint(-7, 8, (2048, 2048), dtype=torch.int8)
    torch._int_mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch._int_mm(a, b)
        best = min(best, time.perf_counter() - start)
    results["torch-_int_mm-512x2048x2048"] = 2 * 512 * 2048 * 2048 / best / 1e12
    return results


# ---- weights, routing -------------------------------------------------------------------------


def random_packed_experts(seed: int) -> PackedExpertWeights:
    """Random int4 experts in the on-disk packed layout (any byte is a valid pair of nibbles)."""
    g = torch.Generator().manual_seed(seed)
    return PackedExpertWeights(
        w13=torch.randint(-128, 128, (EXPERTS, INTER, HIDDEN), dtype=torch.int8, generator=g),
        w13_scale=torch.rand(EXPERTS, 2 * INTER, generator=g) * 2e-3 + 1e-4,
        w2=torch.randint(-128, 128, (EXPERTS, HIDDEN // 2, INTER), dtype=torch.int8, generator=g),
        w2_scale=torch.rand(EXPERTS, HIDDEN, generator=g) * 2e-3 + 1e-4,
    )


@dataclass
class Routed:
    """One call's routed rows: ``token_ids`` and ``offsets`` as the MoE layer builds them."""

    token_ids: torch.Tensor
    offsets: torch.Tensor
    active_experts: int
    row_weights: torch.Tensor


def make_routing(ids: torch.Tensor, g: torch.Generator) -> Routed:
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offsets = torch.zeros(EXPERTS + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.bincount(flat, minlength=EXPERTS), 0)
    return Routed(torch.div(order, ids.shape[1], rounding_mode="floor"), offsets, int((offsets.diff() > 0).sum()),
                  torch.rand(flat.numel(), generator=g))


def routings_for(m: int, count: int, seed: int, shared: bool = False) -> list[Routed]:
    """``count`` routings of ``m`` tokens, top-8 of 32. For M = 1 they cycle through disjoint
    expert sets; with ``shared`` every token of a call goes to the same 8 experts."""
    g = torch.Generator().manual_seed(seed)
    out = []
    perm = torch.randperm(EXPERTS, generator=g)
    for c in range(count):
        if m == 1 or shared:
            start = (c * TOP_K) % EXPERTS
            ids = perm[start:start + TOP_K].unsqueeze(0).repeat(m, 1)
        else:
            ids = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOP_K] for _ in range(m)])
        out.append(make_routing(ids, g))
    return out


# ---- baselines: one call = the routed-expert path for one routing ---------------------------------


ExpertCall = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, Routed], torch.Tensor]


def per_expert_rows(r: Routed, dtype: torch.dtype,
                    expert_rows: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The routed rows ``[R, H]`` in ``dtype``, expert by expert: ``expert_rows(e, tokens)``
    computes expert ``e``'s rows for the token ids ``tokens``; empty experts cost nothing."""
    out = torch.empty((r.token_ids.numel(), HIDDEN), dtype=dtype)
    offsets = r.offsets.tolist()
    for e in range(EXPERTS):
        lo, hi = offsets[e], offsets[e + 1]
        if lo < hi:
            out[lo:hi] = expert_rows(e, r.token_ids[lo:hi])
    return out


def float_moe(weights: list[list[tuple[torch.Tensor, torch.Tensor]]], dtype: torch.dtype) -> ExpertCall:
    """bf16/fp32 experts: ``down(silu(gate) * up)`` with plain torch matmuls per expert."""

    def call(layer: int, x: torch.Tensor, x_q: torch.Tensor, x_scale: torch.Tensor, r: Routed) -> torch.Tensor:
        xd = x.to(dtype)

        def rows(e: int, tokens: torch.Tensor) -> torch.Tensor:
            w13, w2 = weights[layer][e]
            gate_up = xd[tokens] @ w13.T
            return (F.silu(gate_up[:, :INTER]) * gate_up[:, INTER:]) @ w2.T

        return per_expert_rows(r, dtype, rows)

    return call


def w8a8_moe(weights: list[list[tuple]], alpha: torch.Tensor) -> ExpertCall:
    """W8A8 with ``torch._int_mm``: the same integer weights held as int8 ``[K, N]``."""

    def call(layer: int, x: torch.Tensor, x_q: torch.Tensor, x_scale: torch.Tensor, r: Routed) -> torch.Tensor:
        def rows(e: int, tokens: torch.Tensor) -> torch.Tensor:
            w13_t, s13, w2_t, s2 = weights[layer][e]
            gate_up = (torch._int_mm(x_q[tokens], w13_t).float() * x_scale[tokens] * s13).to(torch.bfloat16)
            h_q, c = swiglu_clip_quant(gate_up, alpha[e])
            return (torch._int_mm(h_q, w2_t).float() * c * s2).to(torch.bfloat16)

        return per_expert_rows(r, torch.bfloat16, rows)

    return call


def int4pack_moe(weights: list[list[tuple]]) -> ExpertCall:
    """``_weight_int4pack_mm_for_cpu``: int4 weights, bf16 activations."""
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu

    def call(layer: int, x: torch.Tensor, x_q: torch.Tensor, x_scale: torch.Tensor, r: Routed) -> torch.Tensor:
        def rows(e: int, tokens: torch.Tensor) -> torch.Tensor:
            w13, sz13, w2, sz2 = weights[layer][e]
            gate_up = mm(x[tokens], w13, 256, sz13)
            return mm(F.silu(gate_up[:, :INTER]) * gate_up[:, INTER:], w2, 256, sz2)

        return per_expert_rows(r, torch.bfloat16, rows)

    return call


def int4pack_weights(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 values ``[N, K]`` and per-channel scales to the int4pack format (groups of 256)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8), 2)
    sz = torch.zeros(q.shape[1] // 256, q.shape[0], 2, dtype=torch.bfloat16)
    sz[..., 0] = scale.to(torch.bfloat16)
    return packed, sz


def whole_layer(packed: PackedExpertWeights, alpha: torch.Tensor, seed: int) -> W4A8MoE:
    """The full MoE block on the native backend: DeepSeek-V3 routing (noaux_tc, 8 groups, best
    4, top-8, scaling 2.5) over the 32 experts, plus a W8A8 shared expert of the same width."""
    g = torch.Generator().manual_seed(seed)
    routing = RoutingConfig("noaux_tc", EXPERTS, TOP_K, n_group=8, topk_group=4, routed_scaling_factor=2.5)
    experts = PackedExperts(packed.w13, packed.w13_scale, packed.w2, packed.w2_scale, alpha)

    def w8a8(n: int, k: int) -> W8A8Linear:
        return W8A8Linear(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g),
                          torch.rand(n, generator=g) * 2e-3 + 1e-4, backend="cpu")

    shared = SharedExpert(w8a8(INTER, HIDDEN), w8a8(INTER, HIDDEN), w8a8(HIDDEN, INTER))
    router = (torch.randn(EXPERTS, HIDDEN, generator=g) * 0.02).to(torch.bfloat16)
    bias = torch.randn(EXPERTS, generator=g) * 0.01
    return W4A8MoE(router, routing, experts, bias, shared, backend="cpu", keep_packed=True)


# ---- the block among a decoder layer's torch work -------------------------------------------------


class DecoderTorchWork:
    """The torch work of a DeepSeek-V3 decoder layer around its MoE block, in bf16 at the real
    shapes: input RMSNorm; MLA attention (q_a 7168->1536, RMSNorm, q_b 1536->128x192,
    kv_a 7168->576, RMSNorm, kv_b 512->128x256, SDPA over ``context`` cached positions plus the
    token at decode, causal over the M tokens at prefill, o_proj 16384->7168); the residual add
    and the post-attention RMSNorm, whose output is the MoE block's input. RoPE is left out
    (elementwise, small). About 0.4 GB of weights, read at every call like a real layer's."""

    HEADS, Q_LORA, KV_LORA, NOPE, ROPE, V = 128, 1536, 512, 128, 64, 128

    def __init__(self, seed: int, context: int = 512):
        g = torch.Generator().manual_seed(seed)

        def weight(n: int, k: int) -> torch.Tensor:
            return (torch.randn(n, k, generator=g) / k**0.5).to(torch.bfloat16)

        heads, qk = self.HEADS, self.NOPE + self.ROPE
        self.q_a, self.q_b = weight(self.Q_LORA, HIDDEN), weight(heads * qk, self.Q_LORA)
        self.kv_a = weight(self.KV_LORA + self.ROPE, HIDDEN)
        self.kv_b = weight(heads * (self.NOPE + self.V), self.KV_LORA)
        self.o_proj = weight(HIDDEN, heads * self.V)
        self.k_cache = torch.randn(1, heads, context + 1, qk, generator=g).to(torch.bfloat16)
        self.v_cache = torch.randn(1, heads, context + 1, self.V, generator=g).to(torch.bfloat16)

    def weight_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in (self.q_a, self.q_b, self.kv_a, self.kv_b, self.o_proj))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m, heads = x.shape[0], self.HEADS
        h = F.rms_norm(x, (HIDDEN,), eps=1e-6)
        q = F.linear(F.rms_norm(F.linear(h, self.q_a), (self.Q_LORA,), eps=1e-6), self.q_b)
        q = q.view(m, heads, -1).transpose(0, 1).unsqueeze(0)
        c_kv, k_pe = F.linear(h, self.kv_a).split([self.KV_LORA, self.ROPE], dim=-1)
        kv = F.linear(F.rms_norm(c_kv, (self.KV_LORA,), eps=1e-6), self.kv_b).view(m, heads, -1)
        k_nope, v = kv.split([self.NOPE, self.V], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(m, heads, self.ROPE)], dim=-1)
        k, v = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        if m == 1:  # decode: the new position joins the cached ones
            self.k_cache[:, :, -1:] = k
            self.v_cache[:, :, -1:] = v
            attn = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache)
        else:
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = F.linear(attn.squeeze(0).transpose(0, 1).reshape(m, heads * self.V), self.o_proj)
        return F.rms_norm(x + out, (HIDDEN,), eps=1e-6)


def block_bytes_read(layer: W4A8MoE, x: torch.Tensor) -> int:
    """Bytes one block call must read at least: the routed experts it touches (int4 weights and
    fp32 scales), the W8A8 shared expert (int8 weights and scales) and the bf16 router."""
    active = int(layer.route(x)[1].unique().numel())
    expert = 3 * HIDDEN * INTER // 2 + (2 * INTER + HIDDEN) * 4
    shared = 3 * HIDDEN * INTER + (2 * INTER + HIDDEN) * 4
    return active * expert + shared + layer.router_weight.numel() * layer.router_weight.element_size()


@dataclass
class BlockRun:
    """One M of the interleaved-block run: medians (and bests) of the block alone and of the
    block right after the decoder layer's torch work, the torch work itself, bytes per call,
    and (``paired_floor``) the median over interleaved calls of the time the DRAM probe takes
    to read that many cold bytes right after the call, divided by the call's time."""

    m: int
    alone: Timing
    interleaved: Timing
    torch_work: Timing
    bytes_read: float
    paired_floor: float | None = None


class PairedProbe:
    """The C read probe over ``nbytes`` of a window that moves through a 1 GiB+ buffer (never
    in the cache), to time the bandwidth floor of one block call at the moment it ran: the
    VM's DRAM bandwidth moves by a third from minute to minute, a probe minutes before the
    calls does not say what the calls could have reached. ``huge``: the buffer on transparent
    huge pages (where the weights are) rather than ordinary ones; the caller picks whichever
    read faster at the start, so the floor is the stricter one."""

    def __init__(self, kernel, nbytes: int, prefetch: int, threads: int, huge: bool = False):
        self.kernel, self.nbytes, self.prefetch, self.threads = kernel, nbytes, prefetch, threads
        size = max(GIB + 256 * 1024**2, 4 * nbytes)
        self.buf = random_weight_buffer(size) if huge else torch.randint(0, 256, (size,), dtype=torch.uint8)
        self.offset = 0

    def seconds(self) -> float:
        if self.offset + self.nbytes > self.buf.numel():
            self.offset = 0
        start = time.perf_counter()
        self.kernel.lib.w4a8_probe_read(self.buf.data_ptr() + self.offset, self.nbytes, self.prefetch, self.threads)
        elapsed = time.perf_counter() - start
        self.offset += self.nbytes + 4096
        return elapsed


def time_block_interleaved(layer: W4A8MoE, work: DecoderTorchWork, m: int, calls: int, rounds: int,
                           seed: int, probe: PairedProbe | None = None) -> BlockRun:
    """Time ``layer`` on ``calls`` fresh inputs, once back to back ("alone") and once each call
    right after the torch work that produces its input ("interleaved", as a model runs it),
    alternating the two in ``rounds`` so that both see the same machine. Only the block is
    timed; the inputs, hence routings, are the same in both. With ``probe`` (sized to the
    block's bytes) each interleaved call is followed by a probe read, for the paired floor."""
    g = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(m, HIDDEN, generator=g) * 0.5).to(torch.bfloat16) for _ in range(calls)]
    inputs = [work(x) for x in xs]
    layer(inputs[0])  # warm: scratch, tables
    alone, interleaved, torch_times, paired = [], [], [], []
    for _ in range(rounds):
        for x in xs:
            start = time.perf_counter()
            y = work(x)
            middle = time.perf_counter()
            layer(y)
            interleaved.append(time.perf_counter() - middle)
            torch_times.append(middle - start)
            if probe is not None:
                paired.append(probe.seconds() / interleaved[-1])
        for y in inputs:
            start = time.perf_counter()
            layer(y)
            alone.append(time.perf_counter() - start)

    def timing(ts: list[float]) -> Timing:
        return Timing(min(ts), statistics.median(ts))

    return BlockRun(m, timing(alone), timing(interleaved), timing(torch_times),
                    statistics.mean(block_bytes_read(layer, y) for y in inputs),
                    statistics.median(paired) if paired else None)


def block_targets(runs: dict[int, BlockRun], dram_bw: float) -> list[tuple[str, bool]]:
    """The issue's targets for the interleaved block, each as (line, passed). The bandwidth
    floor is judged paired (each call against a probe read of its bytes right after it) when
    the run has it; the floor at the probe's best bandwidth of the run's start is printed too."""
    out = []
    if 1 in runs:
        r = runs[1]
        ratio = r.interleaved.median / r.alone.median
        out.append((f"M=1 interleaved within 1.25x of alone (medians): {r.interleaved.median * 1e3:.2f} / "
                    f"{r.alone.median * 1e3:.2f} ms = {ratio:.2f}x", ratio <= 1.25))
        floor = r.bytes_read / (dram_bw * 1e9)
        frac = floor / r.interleaved.median
        line = (f"M=1 interleaved >= 85% of the bandwidth floor ({r.bytes_read / 1e6:.0f} MB: routed experts "
                f"touched + shared expert + router; at the start's {dram_bw:.1f} GB/s = {floor * 1e3:.2f} ms: "
                f"{frac:.0%}, best call {floor / r.interleaved.best:.0%}")
        if r.paired_floor is None:
            out.append((line + ")", frac >= 0.85))
        else:
            out.append((line + f"; paired, median over calls of the probe's read of the same bytes right after "
                        f"each call / the call: {r.paired_floor:.0%})", r.paired_floor >= 0.85))
    if 512 in runs:
        r = runs[512]
        ratio = r.interleaved.median / r.alone.median
        out.append((f"M=512 interleaved no slower than alone (medians, 5% allowed for noise): "
                    f"{r.interleaved.median * 1e3:.1f} / {r.alone.median * 1e3:.1f} ms = {ratio:.2f}x",
                    ratio <= 1.05))
    return out


def print_block_runs(runs: dict[int, BlockRun], dram_bw: float) -> None:
    print("\nthe whole W4A8MoE block among a decoder layer's torch work (MLA attention, norms), per block call, ms:\n")
    print("| M | alone median (best) | interleaved median (best) | interleaved / alone | torch work median "
          "| MB read per call |")
    print("|---|---|---|---|---|---|")
    for m, r in sorted(runs.items()):
        print(f"| {m} | {r.alone.median * 1e3:.2f} ({r.alone.best * 1e3:.2f}) | {r.interleaved.median * 1e3:.2f} "
              f"({r.interleaved.best * 1e3:.2f}) | {r.interleaved.median / r.alone.median:.2f}x "
              f"| {r.torch_work.median * 1e3:.1f} | {r.bytes_read / 1e6:.0f} |")
    print("\ntargets (interleaved block):")
    for line, ok in block_targets(runs, dram_bw):
        print(f"  {line} -> {'PASS' if ok else 'FAIL'}")


def run_block_section(layer: W4A8MoE, dram_bw: float, quick: bool, kernel=None,
                      probe_variant: tuple[int, int, bool] | None = None) -> dict[int, BlockRun]:
    """The interleaved-block measurement at M=1 and M=512 (its own torch work, freed after);
    with ``kernel`` and ``probe_variant`` (prefetch, threads, huge pages: the probe's best)
    the M=1 calls are paired with probe reads of their bytes."""
    work = DecoderTorchWork(seed=11)
    print(f"\ndecoder torch work: {work.weight_bytes() / 1e6:.0f} MB of bf16 attention weights, "
          f"{work.k_cache.shape[2] - 1} cached positions at decode", flush=True)
    runs = {}
    # M=512: 18 calls of each kind (6 rounds of 3), not 9: on a noisy host the median of 9
    # half-second calls moved by up to 10 % between runs with no difference in the best calls.
    for m, calls, rounds in ((1, 8, 3 if quick else 6), (512, 2 if quick else 3, 1 if quick else 6)):
        probe = None
        if m == 1 and kernel is not None and probe_variant is not None:
            x = (torch.randn(1, HIDDEN) * 0.5).to(torch.bfloat16)
            probe = PairedProbe(kernel, block_bytes_read(layer, work(x)), *probe_variant)
        runs[m] = time_block_interleaved(layer, work, m, calls, rounds, seed=1000 + m, probe=probe)
        del probe
        r = runs[m]
        print(f"  block        M={m:<9d} alone median {r.alone.median * 1e3:.2f} ms, interleaved median "
              f"{r.interleaved.median * 1e3:.2f} ms, torch work {r.torch_work.median * 1e3:.1f} ms", flush=True)
    print_block_runs(runs, dram_bw)
    return runs


WAIT_POLICIES = ("default", "PASSIVE", "ACTIVE")


def wait_policy_table(quick: bool) -> None:
    """The interleaved block under each ``OMP_WAIT_POLICY``, each in its own process (the
    policy is read once, when the OpenMP runtime starts)."""
    import json
    import subprocess
    import sys

    rows = {}
    for policy in WAIT_POLICIES:
        env = dict(os.environ)
        env.pop("OMP_WAIT_POLICY", None)
        if policy != "default":
            env["OMP_WAIT_POLICY"] = policy
        cmd = [sys.executable, __file__, "--block-only", *(["--quick"] if quick else [])]
        print(f"  OMP_WAIT_POLICY={policy}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BLOCK_RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"    failed (exit {proc.returncode}): {proc.stderr[-500:]}")
            continue
        rows[policy] = json.loads(line.split(" ", 1)[1])
    print("\nthe interleaved block by OMP_WAIT_POLICY (one process each), median ms:\n")
    print("| setting | M=1 block | M=1 alone | M=1 at % of the paired floor | M=512 block | M=512 alone |")
    print("|---|---|---|---|---|---|")
    for policy, r in rows.items():
        name = "default" if policy == "default" else f"`OMP_WAIT_POLICY={policy}`"
        paired = r["1"].get("paired_floor")
        print(f"| {name} | {r['1']['interleaved'] * 1e3:.2f} | {r['1']['alone'] * 1e3:.2f} "
              f"| {'-' if paired is None else f'{paired:.0%}'} "
              f"| {r['512']['interleaved'] * 1e3:.1f} | {r['512']['alone'] * 1e3:.1f} |")


def block_only(quick: bool) -> None:
    """``--block-only``: the DRAM probe and the interleaved-block section alone, then one
    ``BLOCK_RESULT {json}`` line (what :func:`wait_policy_table` reads)."""
    import json

    backend = get_backend("cpu")
    print(f"# interleaved W4A8MoE block, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
          f"threads {torch.get_num_threads()}, kernel ISA={backend.isa}, OpenMP runtime "
          f"{backend.kernel.openmp_runtime}")
    dram = probe_dram_read(backend.kernel, (1 if quick else 2) * GIB + 256 * 1024**2, repeats=2 if quick else 3)
    dram_bw = max(dram.values())
    print("DRAM read (GB/s): " + ", ".join(f"{k} {v:.1f}" for k, v in dram.items()), flush=True)
    layer = whole_layer(random_packed_experts(seed=100), torch.linspace(0.6, 1.0, EXPERTS), seed=7)
    runs = run_block_section(layer, dram_bw, quick, backend.kernel, best_read_variant(dram))
    print("BLOCK_RESULT " + json.dumps({str(m): {"alone": r.alone.median, "interleaved": r.interleaved.median,
                                                 "bytes": r.bytes_read, "paired_floor": r.paired_floor}
                                       for m, r in runs.items()}
                                       | {"dram_gbs": dram_bw}))


# ---- timing -------------------------------------------------------------------------------------


@dataclass
class Timing:
    best: float
    median: float
    threads: int = 0


def time_calls(fn: Callable[[int], object], repeats: int, warmup: int) -> Timing:
    """``fn(i)`` runs call ``i`` (which picks its layer copy and routing); returns seconds."""
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(warmup, warmup + repeats):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return Timing(min(times), statistics.median(times))


def peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats, smaller probe, one thread count, no fp32, baselines not at M=512")
    parser.add_argument("--threads", default=None,
                        help="thread counts to time every implementation with, the best one counting "
                             "(default '1,max', with --quick 'max': on a busy machine torch's OpenMP "
                             "barriers can cost more than the second core brings)")
    parser.add_argument("--skip", default="", help="comma-separated baselines to skip (bf16,fp32,w8a8,int4pack,reference)")
    parser.add_argument("--block-only", action="store_true",
                        help="only the whole block among a decoder layer's torch work (and the DRAM probe)")
    parser.add_argument("--wait-policies", action="store_true",
                        help="also time the interleaved block under each OMP_WAIT_POLICY, one process each "
                             "(always done without --quick; with --block-only, only that table)")
    args = parser.parse_args()
    if args.block_only:
        # With --wait-policies: only the table (its "default" row is a plain --block-only run).
        wait_policy_table(args.quick) if args.wait_policies else block_only(args.quick)
        return
    max_threads = torch.get_num_threads()
    thread_spec = args.threads or ("max" if args.quick else "1,max")
    thread_counts = sorted({max_threads if t == "max" else int(t) for t in thread_spec.split(",")})
    skip = set(filter(None, args.skip.split(",")))
    quick = args.quick
    load_before = os.getloadavg()
    backend = get_backend("cpu")
    kernel = backend.kernel
    cpu_name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                    platform.processor())
    print(f"# w4a8moe CPU expert-path benchmark {'(quick)' if quick else ''}")
    print(f"machine: {cpu_name}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()}), threads {thread_counts} (best counts), "
          f"kernel ISA={backend.isa}")
    print(f"loadavg before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    if load_before[0] > 0.5 * (os.cpu_count() or 1) and thread_counts == [max_threads]:
        print("warning: the machine is busy; torch's OpenMP baselines lose far more to that than the kernel "
              "does. Without --quick (or with --threads 1,max) every implementation also runs on one thread.")

    probe_bytes = (1 if quick else 2) * GIB + 256 * 1024**2
    # The probes run three times (start, around the decode runs, around the prefill runs) and
    # the best of all counts: other processes' memory traffic and CPU use vary, and a probe
    # taken at a bad moment would flatter the kernel's fractions.
    probes: dict[str, float] = {}

    def run_probes(when: str) -> None:
        dram = probe_dram_read(kernel, probe_bytes, repeats=2 if quick else 3)
        dot = probe_int8_dot(kernel, repeats=2 if quick else 3)
        print(f"[probes, {when}] DRAM read over {probe_bytes / GIB:.2f} GiB (GB/s): "
              + ", ".join(f"{k} {v:.1f}" for k, v in dram.items())
              + "; int8 dot (TOP/s): " + ", ".join(f"{k} {v:.3f}" for k, v in dot.items()), flush=True)
        if max(dram.values()) > probes.get("dram", 0.0):
            probes["read_variant"] = best_read_variant(dram)
        probes["dram"] = max(probes.get("dram", 0.0), *dram.values())
        probes["int8"] = max(probes.get("int8", 0.0), *(v for k, v in dot.items() if k.startswith("vnni")))
        probes["int_mm"] = max(probes.get("int_mm", 0.0), *(v for k, v in dot.items() if not k.startswith("vnni")))

    print()
    run_probes("start")

    layers = 2  # copies of the int4 expert set (704 MB each), so decode never reads from cache
    print(f"\nexperts: E={EXPERTS}, top-{TOP_K}, H={HIDDEN}, I={INTER}; packed int4 "
          f"{EXPERTS * 3 * HIDDEN * INTER / 2 / 1e6:.0f} MB per layer copy, {layers} copies")
    packed_layers = [random_packed_experts(seed=100 + c) for c in range(layers)]
    start = time.perf_counter()
    prepared = [backend.prepare(p) for p in packed_layers]
    print(f"prepare (re-layout) {(time.perf_counter() - start) / layers:.1f} s per layer")
    alpha = torch.linspace(0.6, 1.0, EXPERTS)

    ms = [1, 8, 64, 512]
    repeats = {1: 6 if quick else 12, 8: 6 if quick else 12, 64: 3 if quick else 5, 512: 1 if quick else 2}
    count = {m: 8 for m in ms}
    routings = {m: routings_for(m, count[m], seed=m) for m in ms}
    routings["8-shared"] = routings_for(8, 8, seed=81, shared=True)
    inputs = {}
    for m in ms:
        x = (torch.randn(m, HIDDEN) * 0.5).to(torch.bfloat16)
        x_q, x_scale = dynamic_quant_per_token(x)
        inputs[m] = (x, x_q, x_scale)
    inputs["8-shared"] = inputs[8]
    cases = [1, 8, "8-shared", 64, 512]
    results: dict[str, dict] = {}

    def run_case(name: str, call: ExpertCall, case, n_layers: int, warm: int | None = None,
                 threads_to_try: list[int] | None = None) -> None:
        m = case if isinstance(case, int) else 8
        rts = routings[case]
        x, x_q, x_scale = inputs[case]

        def one(i: int) -> object:
            # Consecutive calls alternate layer copies first, then routings: (layer, routing)
            # pairs repeat only after n_layers * len(rts) calls.
            return call(i % n_layers, x, x_q, x_scale, rts[(i // n_layers) % len(rts)])

        if warm is None:
            warm = 1 if m >= 64 else 2
        reps = repeats[m] if name == "w4a8-cpu" or not quick else max(1, repeats[m] // 2)
        for nthreads in threads_to_try or thread_counts:
            torch.set_num_threads(nthreads)
            t = time_calls(one, reps, warm)
            t.threads = nthreads
            print(f"  {name:12s} M={str(case):9s} threads={nthreads}  best {t.best * 1e3:9.2f} ms  "
                  f"median {t.median * 1e3:9.2f} ms", flush=True)
            if case not in results.setdefault(name, {}) or t.best < results[name][case].best:
                results[name][case] = t
        torch.set_num_threads(max_threads)

    print("\ntiming (per call; the expert path alone, then with each token's weighted sum):")

    def cpu_call(layer, x, x_q, x_scale, r):
        return backend.grouped_forward(prepared[layer], x_q, x_scale, r.token_ids, r.offsets, alpha)

    # What the layer calls: the expert path plus each token's weighted sum of its rows, once
    # fused in the kernel, once as the kernel's rows summed by torch (the same bits). Timed
    # right after the expert path alone, so that all three see the same machine.
    def fused_sum_call(layer, x, x_q, x_scale, r):
        return backend.combined_forward(prepared[layer], x_q, x_scale, r.token_ids, r.offsets, alpha, r.row_weights)

    def torch_sum_call(layer, x, x_q, x_scale, r):
        rows = backend.grouped_forward(prepared[layer], x_q, x_scale, r.token_ids, r.offsets, alpha)
        return combine_rows(rows, r.token_ids, r.row_weights, x_q.shape[0])

    # The whole block as a model runs it (its own re-laid copy of layer 0), and where its time goes.
    layer = whole_layer(packed_layers[0], alpha, seed=7)
    layer_rows = []

    def time_layer(m: int) -> None:
        x = inputs[m][0]
        parts = {
            "layer": lambda i: layer(x),
            "routing": lambda i: layer.route(x),
            "routed experts + sum": lambda i: layer.routed_experts(x, *layer.route(x)),
            "shared expert (W8A8)": lambda i: layer.shared(x),
        }
        times = {name: time_calls(fn, repeats[m], 1 if m >= 64 else 2).best for name, fn in parts.items()}
        layer_rows.append((m, times))
        print(f"  layer        M={m:<9d} " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items()), flush=True)

    for case in cases:
        if case == 64:
            run_probes("between decode and prefill")
        run_case("w4a8-cpu", cpu_call, case, layers)
        run_case("w4a8-cpu+sum", fused_sum_call, case, layers, threads_to_try=[max_threads])
        run_case("w4a8-cpu+torch-sum", torch_sum_call, case, layers, threads_to_try=[max_threads])
        if isinstance(case, int):
            time_layer(case)
    run_probes("after prefill")
    # The block as a model runs it: right after a decoder layer's torch work (one pool for both).
    block_runs = run_block_section(layer, probes["dram"], quick, kernel, probes["read_variant"])
    del layer
    gc.collect()
    dram_bw, int8_peak = probes["dram"], probes["int8"]
    print(f"-> DRAM read bandwidth {dram_bw:.1f} GB/s, int8 peak {int8_peak:.3f} TOP/s "
          f"(best of all probe runs; torch._int_mm reached {probes['int_mm']:.3f} TOP/s)")

    # Exactness spot check at benchmark scale: the kernel against the reference backend.
    if "reference" not in skip:
        reference = get_backend("reference")
        rt = routings[8][0]
        _, x_q, x_scale = inputs[8]
        a = backend.grouped_forward(prepared[0], x_q, x_scale, rt.token_ids, rt.offsets, alpha)
        b = reference.grouped_forward(packed_layers[0], x_q, x_scale, rt.token_ids, rt.offsets, alpha)
        print(f"  exactness at M=8 vs reference: {'bit-identical' if torch.equal(a.view(torch.int16), b.view(torch.int16)) else 'DIFFERENT'}")

        def ref_call(layer, x, x_q, x_scale, r):
            return reference.grouped_forward(packed_layers[layer], x_q, x_scale, r.token_ids, r.offsets, alpha)

        saved = dict(repeats)
        repeats.update({1: 2})
        for case in (1,):  # seconds per call: the smallest M says enough
            run_case("reference", ref_call, case, layers, warm=1, threads_to_try=[max_threads])
        repeats.update(saved)
    del prepared
    gc.collect()


    def expert_values(layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = packed_layers[layer]
        return unpack_int4_pairs(p.w13[e]), unpack_int4_pairs(p.w2[e])

    if "int4pack" not in skip:
        weights = []
        for layer in range(layers):
            per_expert = []
            for e in range(EXPERTS):
                q13, q2 = expert_values(layer, e)
                per_expert.append((*int4pack_weights(q13, packed_layers[layer].w13_scale[e]),
                                   *int4pack_weights(q2, packed_layers[layer].w2_scale[e])))
            weights.append(per_expert)
        for case in cases:
            if quick and case == 512:
                continue
            run_case("int4pack", int4pack_moe(weights), case, layers)
        del weights
        gc.collect()

    # Only the native kernel and int4pack rotate over both copies; free the second one.
    del packed_layers[1:]
    gc.collect()

    if "w8a8" not in skip:
        # One int8 copy (1.4 GB) rotates over 4 disjoint routings at M = 1: >700 MB per cycle.
        weights = [[(q13.T.contiguous(), packed_layers[0].w13_scale[e], q2.T.contiguous(), packed_layers[0].w2_scale[e])
                    for e in range(EXPERTS) for q13, q2 in [expert_values(0, e)]]]
        for case in cases:
            if quick and case == 512:
                continue
            run_case("w8a8-int_mm", w8a8_moe(weights, alpha), case, 1)
        del weights
        gc.collect()

    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        if name in skip or (quick and name == "fp32"):
            continue
        weights = []
        for e in range(EXPERTS):
            q13, q2 = expert_values(0, e)
            weights.append(((q13.float() * packed_layers[0].w13_scale[e].unsqueeze(1)).to(dtype),
                            (q2.float() * packed_layers[0].w2_scale[e].unsqueeze(1)).to(dtype)))
        for case in cases:
            if quick and case == 512:
                continue
            run_case(name, float_moe([weights], dtype), case, 1)
        del weights
        gc.collect()

    # ---- the tables ----
    print("\nbest time per call (ms):\n\n| implementation | " + " | ".join(f"M={c}" for c in cases) + " |")
    print("|---|" + "---|" * len(cases))
    for name, per_case in results.items():
        print(f"| {name} | " + " | ".join(f"{per_case[c].best * 1e3:.1f} ({per_case[c].threads}t)"
                                           if c in per_case else "-" for c in cases) + " |")
    print("(Nt: the thread count of the best call)")

    expert_bytes = 3 * HIDDEN * INTER / 2
    baselines = [n for n in ("bf16", "fp32", "w8a8-int_mm", "int4pack", "reference") if n in results]
    print("\n| M | w4a8-cpu best / median (ms) | " + " | ".join(f"vs {b}" for b in baselines)
          + " | experts read | GB/s (of DRAM) | TOP/s (of int8 probe) |")
    print("|---|---|" + "---|" * len(baselines) + "---|---|---|")
    for case in cases:
        t = results["w4a8-cpu"][case]
        m = case if isinstance(case, int) else 8
        active = statistics.mean(r.active_experts for r in routings[case])
        gbs = active * expert_bytes / t.best / 1e9
        tops = 2 * m * TOP_K * 3 * HIDDEN * INTER / t.best / 1e12
        ratios = []
        for b in baselines:
            other = results[b].get(case)
            ratios.append(f"{other.best / t.best:.2f}x" if other else "-")
        print(f"| {case} | {t.best * 1e3:.2f} / {t.median * 1e3:.2f} | " + " | ".join(ratios)
              + f" | {active:.1f} | {gbs:.1f} ({gbs / dram_bw:.0%}) | {tops:.3f} ({tops / int8_peak:.0%}) |")
    print("(all figures from the best call: on a shared machine the best is the least disturbed; ratios are\n"
          " baseline time / w4a8-cpu time, > 1 means the native kernel is faster)")

    print("\nexpert path + per-token weighted sum (what W4A8MoE calls), best ms:\n")
    print("| M | expert path alone | + sum fused in the kernel | + sum by torch (index_add_) | torch / fused |")
    print("|---|---|---|---|---|")
    for case in cases:
        alone, fused, by_torch = (results[n][case].best * 1e3 for n in ("w4a8-cpu", "w4a8-cpu+sum",
                                                                         "w4a8-cpu+torch-sum"))
        print(f"| {case} | {alone:.2f} | {fused:.2f} | {by_torch:.2f} | {by_torch / fused:.2f}x |")

    print("\nthe whole W4A8MoE block (routing, routed experts with the fused sum, W8A8 shared expert), best ms:\n")
    print("| M | block | routing | routed experts + sum | shared expert (W8A8) |")
    print("|---|---|---|---|---|")
    for m, times in layer_rows:
        print(f"| {m} | " + " | ".join(f"{times[k] * 1e3:.2f}" for k in ("layer", "routing", "routed experts + sum",
                                                                         "shared expert (W8A8)")) + " |")

    print("\ntargets:")
    t1 = results["w4a8-cpu"][1].best
    gbs1 = routings[1][0].active_experts * expert_bytes / t1 / 1e9

    def verdict(ok: bool) -> str:
        return "MET" if ok else "NOT MET"

    print(f"  decode M=1 >= 80% of DRAM read bandwidth: {gbs1:.1f} / {dram_bw:.1f} GB/s = {gbs1 / dram_bw:.0%} -> "
          f"{verdict(gbs1 >= 0.8 * dram_bw)}")
    # The physical floor of a decode call: its experts' bytes at the measured DRAM bandwidth.
    floor1 = routings[1][0].active_experts * expert_bytes / (dram_bw * 1e9)
    if "int4pack" in results:
        r = results["int4pack"][1].best / t1
        print(f"  decode M=1 >= 1.5x faster than int4pack: {r:.2f}x -> {verdict(r >= 1.5)} (highest possible at "
              f"100% of DRAM bandwidth: {results['int4pack'][1].best / floor1:.2f}x)")
    if "bf16" in results:
        r = results["bf16"][1].best / t1
        print(f"  decode M=1 >= 5x faster than bf16: {r:.2f}x -> {verdict(r >= 5)}")
    r8 = results["w4a8-cpu"][8].best / t1
    r8s = results["w4a8-cpu"]["8-shared"].best / t1
    print(f"  M=8 costs <= 1.5x M=1: random routing {r8:.2f}x -> {verdict(r8 <= 1.5)} "
          f"(M=8 reads {statistics.mean(r.active_experts for r in routings[8]):.1f} experts, M=1 reads 8); "
          f"8 tokens on the same 8 experts {r8s:.2f}x -> {verdict(r8s <= 1.5)}")
    active8 = statistics.mean(r.active_experts for r in routings[8])
    print(f"    (time per expert read at M=8 vs M=1: {(results['w4a8-cpu'][8].best / active8) / (t1 / TOP_K):.2f}x)")
    # The physical floor: M=8 with random routing must read its experts' bytes at least once.
    floor8 = active8 * expert_bytes / (dram_bw * 1e9)
    print(f"    (lowest possible with random routing, reading {active8:.1f} experts at 100% of the measured "
          f"DRAM bandwidth: {floor8 * 1e3:.2f} ms = {floor8 / t1:.2f}x M=1)")
    for m in (64, 512):
        t = results["w4a8-cpu"][m].best
        if "w8a8-int_mm" in results and m in results["w8a8-int_mm"]:
            r = results["w8a8-int_mm"][m].best / t
            print(f"  prefill M={m} at least as fast as W8A8 _int_mm: {r:.2f}x -> {verdict(r >= 1.0)}")
        if "bf16" in results and m in results["bf16"]:
            r = t / results["bf16"][m].best
            # The physical floor: every multiply-add at the measured int8 peak, nothing else.
            floor = 2 * m * TOP_K * 3 * HIDDEN * INTER / (int8_peak * 1e12)
            print(f"  prefill M={m} <= 0.25x bf16 time: {r:.2f}x -> {verdict(r <= 0.25)} (lowest possible at "
                  f"100% of the int8 probe: {floor * 1e3:.1f} ms = {floor / results['bf16'][m].best:.2f}x bf16)")
    print_block_runs(block_runs, dram_bw)
    if args.wait_policies or not quick:
        print("\nOMP_WAIT_POLICY comparison (the interleaved block, a process per setting):")
        wait_policy_table(quick)
    load_after = os.getloadavg()
    print(f"\nloadavg after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; "
          f"peak RSS {peak_rss_gib():.1f} GiB")


if __name__ == "__main__":
    main()
