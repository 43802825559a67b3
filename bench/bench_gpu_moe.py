"""Benchmark: the Triton W4A8 expert path on an NVIDIA GPU against bf16 and W8A8 baselines.

Run ``PYTHONPATH=src python bench/bench_gpu_moe.py`` on a machine with a CUDA GPU (``--quick``
for a short run; without CUDA it prints a message and exits 0). One run measures

* a bandwidth probe: device-to-device ``copy_`` of a 2 GiB buffer (read + write bytes / time);
* one MoE layer's routed-expert path at DeepSeek-V3 shapes (256 experts, top-8, H=7168,
  I=2048) at M = 1, 8, 64, 512, 4096 tokens, the same routed rows for every implementation:
  - ``triton``: this package's backend (per-token quantization, GMM1, SwiGLU-clip-quant,
    GMM2 and the weighted sum: what :class:`~w4a8moe.moe.W4A8MoE` calls);
  - ``bf16``: ``torch._grouped_mm`` over the experts on bf16 weights (a per-expert loop of
    ``torch.mm`` where ``_grouped_mm`` is missing or refuses), SwiGLU in bf16, the same sum;
  - ``w8a8``: ``torch._int_mm`` per expert on int8 weights (rows zero-padded to its M > 16),
    the same SwiGLU-clip-quant between the GEMMs, the same sum;
* a correctness check at M = 2: the Triton output against the reference backend on the CPU
  (the active experts only), bit for bit.

The table gives median and best milliseconds per call (CUDA events), the speed-ups of Triton,
the packed int4 bytes of the active experts the Triton path reads per call as GB/s and as a
fraction of the probe (the decode figure), and int8 TOP/s, both from the faster of the eager
call and its CUDA-graph replay (decode is launch-bound in Python; engines replay graphs). Targets printed at the end:
decode (M <= 16) at least 70 % of the probe bandwidth; M = 4096 at least 1.5x bf16.
Memory: ~6 GB (int4) + 23 GB (bf16) + 11 GB (int8) of weights, plus activations.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

HIDDEN, INTER, EXPERTS, TOP_K = 7168, 2048, 256, 8
M_VALUES = (1, 8, 64, 512, 4096)
GB = 1e9


DEVICE = "cuda"


def dry_run_setup() -> None:
    """``--cpu-dry-run``: tiny shapes on CPU tensors under Triton's interpreter, to check the
    script's own logic without a GPU (set before the kernels are first imported)."""
    import os

    global DEVICE, HIDDEN, INTER, EXPERTS
    os.environ["TRITON_INTERPRET"] = "1"
    DEVICE, HIDDEN, INTER, EXPERTS = "cpu", 64, 32, 16


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def cuda_time(fn: Callable[[], object], repeats: int, warmup: int) -> tuple[float, float]:
    """(median, best) milliseconds of ``fn`` over ``repeats`` calls, timed with CUDA events."""
    if DEVICE != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times), min(times)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times)


def graphed(fn: Callable[[], object]) -> Callable[[], object] | None:
    """``fn`` captured in a CUDA graph (replayed without Python or launch overhead, as serving
    engines run decode), or None where capture fails (the reason is printed)."""
    if DEVICE != "cuda":
        return None
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except RuntimeError as exc:
        print(f"  CUDA graph capture failed ({str(exc).splitlines()[0][:120]}); no graph timing")
        return None


def probe_copy_bandwidth(repeats: int) -> float:
    """GB/s of a device-to-device copy (bytes read + bytes written, per second)."""
    n = 2 * 1024**3 if DEVICE == "cuda" else 2**20
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE).random_(0, 255)
    dst = torch.empty_like(src)
    median, best = cuda_time(lambda: dst.copy_(src), repeats, warmup=3)
    del src, dst
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return 2 * n / (best * 1e-3) / GB


def routed_rows(m: int, seed: int) -> dict[str, torch.Tensor]:
    """Random top-8 routing of ``m`` tokens, as :meth:`W4A8MoE.routed_experts` lays it out."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    ids = torch.rand(m, EXPERTS, generator=g, device=DEVICE).topk(TOP_K, dim=-1).indices
    weights = torch.rand(m, TOP_K, generator=g, device=DEVICE)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offsets = torch.searchsorted(flat[order].contiguous(), torch.arange(EXPERTS + 1, device=DEVICE))
    return {"ids": ids, "token_ids": torch.div(order, TOP_K, rounding_mode="floor"), "offsets": offsets,
            "row_weights": weights.reshape(-1)[order].contiguous()}


def combine(rows: torch.Tensor, r: dict, m: int) -> torch.Tensor:
    out = torch.zeros((m, rows.shape[1]), dtype=torch.float32, device=rows.device)
    out.index_add_(0, r["token_ids"], rows.float() * r["row_weights"].unsqueeze(-1))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="M = 1 and 4096 only, fewer repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="check the script itself on the CPU: tiny shapes, Triton's interpreter, no timings that mean anything")
    parser.add_argument("--skip", default="", help="comma-separated baselines to skip (bf16,w8a8,check)")
    args = parser.parse_args()
    if args.cpu_dry_run:
        dry_run_setup()
    elif not torch.cuda.is_available():
        print("bench_gpu_moe: no CUDA device here; this benchmark needs an NVIDIA GPU (nothing run).")
        return 0
    try:
        import triton
    except ImportError:
        print("bench_gpu_moe: triton is not installed (pip install -e '.[triton]'); nothing run.")
        return 0
    from w4a8moe.kernels import PackedExpertWeights
    from w4a8moe.kernels.reference import ReferenceBackend
    from w4a8moe.kernels.triton_backend import TritonBackend, default_gemm_config
    from w4a8moe.quant import swiglu_clip_quant
    from w4a8moe.quant.matmul import scale_int32

    skip = set(filter(None, args.skip.split(",")))
    m_values = (1, 4096) if args.quick else M_VALUES
    if args.cpu_dry_run:
        m_values = (1, 8, 40)
    repeats = args.repeats or (5 if args.quick else 20)
    t0 = time.time()
    if DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, "
              f"triton {triton.__version__}, CUDA {torch.version.cuda}")
    bandwidth = probe_copy_bandwidth(repeats)
    print(f"bandwidth probe (device-to-device copy, {'2 GiB' if DEVICE == 'cuda' else '1 MiB'}): {bandwidth:.0f} GB/s")

    # ---- weights: the same integers in every representation --------------------------------
    g = torch.Generator(device=DEVICE).manual_seed(0)
    w13_q = torch.randint(-7, 8, (EXPERTS, 2 * INTER, HIDDEN), dtype=torch.int8, device=DEVICE, generator=g)
    w2_q = torch.randint(-7, 8, (EXPERTS, HIDDEN, INTER), dtype=torch.int8, device=DEVICE, generator=g)
    w13_s = torch.rand(EXPERTS, 2 * INTER, device=DEVICE, generator=g) * 0.01 + 1e-3
    w2_s = torch.rand(EXPERTS, HIDDEN, device=DEVICE, generator=g) * 0.01 + 1e-3
    alpha = torch.rand(EXPERTS, device=DEVICE, generator=g) * 0.5 + 0.5

    def pack(q: torch.Tensor) -> torch.Tensor:  # SPEC 4, in place of quant.pack_int4_pairs (GPU, no checks)
        return ((q[:, 0::2] & 0x0F) | ((q[:, 1::2] & 0x0F) << 4)).to(torch.int8)

    packed = PackedExpertWeights(pack(w13_q), w13_s, pack(w2_q), w2_s)
    backend = TritonBackend()
    prepared = backend.prepare(packed)
    bf16_w13 = bf16_w2 = None
    if "bf16" not in skip:  # dequantized one expert at a time (no fp32 copy of the whole set)
        bf16_w13 = torch.empty((EXPERTS, 2 * INTER, HIDDEN), dtype=torch.bfloat16, device=DEVICE)
        bf16_w2 = torch.empty((EXPERTS, HIDDEN, INTER), dtype=torch.bfloat16, device=DEVICE)
        for e in range(EXPERTS):
            bf16_w13[e] = w13_q[e].float() * w13_s[e].unsqueeze(-1)
            bf16_w2[e] = w2_q[e].float() * w2_s[e].unsqueeze(-1)
    if "w8a8" in skip:
        del w13_q, w2_q
    sync()
    print(f"weights ready in {time.time() - t0:.0f} s; int4 packed {(packed.w13.numel() + packed.w2.numel()) / GB:.2f} GB")

    def triton_call(x: torch.Tensor, r: dict) -> torch.Tensor:
        x_q, x_scale = backend.quantize_per_token(x)
        return backend.combined_forward(prepared, x_q, x_scale, r["token_ids"], r["offsets"], alpha, r["row_weights"])

    grouped_ok = hasattr(torch, "_grouped_mm")

    def bf16_call(x: torch.Tensor, r: dict, spans: list[tuple[int, int, int]]) -> torch.Tensor:
        nonlocal grouped_ok
        xs = x[r["token_ids"]]
        if grouped_ok:
            try:
                ends = r["offsets"][1:].to(torch.int32)
                gu = torch._grouped_mm(xs, bf16_w13.transpose(1, 2), offs=ends)
                h = F.silu(gu[:, :INTER]) * gu[:, INTER:]
                return combine(torch._grouped_mm(h, bf16_w2.transpose(1, 2), offs=ends), r, x.shape[0])
            except (RuntimeError, TypeError) as exc:
                print(f"  torch._grouped_mm unavailable here ({str(exc).splitlines()[0][:100]}); per-expert loop")
                grouped_ok = False
        rows = torch.empty((xs.shape[0], HIDDEN), dtype=torch.bfloat16, device=DEVICE)
        for e, lo, hi in spans:
            gu = xs[lo:hi] @ bf16_w13[e].T
            rows[lo:hi] = (F.silu(gu[:, :INTER]) * gu[:, INTER:]) @ bf16_w2[e].T
        return combine(rows, r, x.shape[0])

    def int_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        m = a.shape[0]
        if m <= 16:
            a = F.pad(a, (0, 0, 0, 17 - m))
        return torch._int_mm(a, w.T)[:m]

    def w8a8_call(x: torch.Tensor, r: dict, spans: list[tuple[int, int, int]]) -> torch.Tensor:
        x_q, x_scale = backend.quantize_per_token(x)
        xs_q, xs_scale = x_q[r["token_ids"]], x_scale[r["token_ids"]]
        rows = torch.empty((xs_q.shape[0], HIDDEN), dtype=torch.bfloat16, device=DEVICE)
        for e, lo, hi in spans:
            gu = scale_int32(int_mm(xs_q[lo:hi], w13_q[e]), xs_scale[lo:hi], w13_s[e])
            h_q, h_scale = swiglu_clip_quant(gu, alpha[e])
            rows[lo:hi] = scale_int32(int_mm(h_q, w2_q[e]), h_scale, w2_s[e])
        return combine(rows, r, x.shape[0])

    # ---- correctness on the real GPU: M = 8 against the CPU reference ----------------------
    if "check" not in skip:
        r = routed_rows(2, seed=99)  # ~16 experts: the CPU reference is slow at these shapes
        x = (torch.randn(2, HIDDEN, device=DEVICE) * 2).to(torch.bfloat16)
        got = triton_call(x, r).cpu()
        assert got.shape == (x.shape[0], HIDDEN)
        active = torch.unique(r["ids"]).cpu()
        remap = torch.full((EXPERTS,), -1, dtype=torch.int64)
        remap[active] = torch.arange(active.numel())
        sub = PackedExpertWeights(packed.w13[active.to(DEVICE)].cpu(), w13_s[active.to(DEVICE)].cpu(),
                                  packed.w2[active.to(DEVICE)].cpu(), w2_s[active.to(DEVICE)].cpu())
        ids = remap[r["ids"].cpu()].reshape(-1)
        order = torch.argsort(ids, stable=True)
        offsets = torch.searchsorted(ids[order].contiguous(), torch.arange(active.numel() + 1))
        ref = ReferenceBackend()
        x_q, x_scale = ref.quantize_per_token(x.cpu())
        expect = ref.combined_forward(sub, x_q, x_scale, torch.div(order, TOP_K, rounding_mode="floor"), offsets,
                                      alpha[active.to(DEVICE)].cpu(), r["row_weights"].cpu())
        differ = int((got.view(torch.int32) != expect.view(torch.int32)).sum())
        print(f"check M=2: triton vs the CPU reference: {differ} of {got.numel()} fp32 outputs differ "
              f"(max |diff| {float((got - expect).abs().max()):.3g})")

    # ---- timings --------------------------------------------------------------------------
    rows_out = []
    for m in m_values:
        r = routed_rows(m, seed=m)
        x = (torch.randn(m, HIDDEN, device=DEVICE) * 2).to(torch.bfloat16)
        offs = r["offsets"].tolist()
        spans = [(e, offs[e], offs[e + 1]) for e in range(EXPERTS) if offs[e + 1] > offs[e]]
        n_active = len(spans)
        rows = m * TOP_K
        weight_bytes = n_active * (INTER * HIDDEN + HIDDEN // 2 * INTER + 4 * (2 * INTER + HIDDEN))
        ops = 2 * rows * (HIDDEN * 2 * INTER + INTER * HIDDEN)
        cfg = default_gemm_config(rows, EXPERTS)
        t_tri = cuda_time(lambda: triton_call(x, r), repeats, warmup=3)
        replay = graphed(lambda: triton_call(x, r))
        t_graph = cuda_time(replay, repeats, warmup=3) if replay else None
        t_bf = cuda_time(lambda: bf16_call(x, r, spans), repeats, warmup=2) if "bf16" not in skip else None
        t_w8 = cuda_time(lambda: w8a8_call(x, r, spans), repeats, warmup=2) if "w8a8" not in skip else None
        best = min(t_tri[1], t_graph[1]) if t_graph else t_tri[1]
        gbs = weight_bytes / (best * 1e-3) / GB
        rows_out.append((m, n_active, cfg, t_tri, t_graph, t_bf, t_w8, gbs, ops / (best * 1e-3) / 1e12))
        print(f"  M={m}: done ({time.time() - t0:.0f} s)", flush=True)

    print(f"\nDeepSeek-V3 routed experts: E={EXPERTS}, top-{TOP_K}, H={HIDDEN}, I={INTER}; ms per call "
          f"(median / best of {repeats}); bf16 = {'torch._grouped_mm' if grouped_ok else 'per-expert torch.mm'}")
    print(f"{'M':>5} {'experts':>7} {'tile':>12} {'triton':>15} {'triton graph':>15} {'bf16':>15} {'w8a8 _int_mm':>15} "
          f"{'x bf16':>7} {'x w8a8':>7} {'int4 GB/s':>10} {'of probe':>8} {'TOP/s':>6}")

    def fmt(t):
        return f"{t[0]:7.3f}/{t[1]:7.3f}" if t else f"{'-':>15}"

    for m, n_active, cfg, t_tri, t_graph, t_bf, t_w8, gbs, tops in rows_out:
        tile = f"{cfg.block_m}x{2 * cfg.block_p}x{cfg.block_k}"
        # Speed-ups compare eager calls with eager calls (the baselines are not graphed).
        sp_bf = f"{t_bf[1] / t_tri[1]:7.2f}" if t_bf else f"{'-':>7}"
        sp_w8 = f"{t_w8[1] / t_tri[1]:7.2f}" if t_w8 else f"{'-':>7}"
        print(f"{m:>5} {n_active:>7} {tile:>12} {fmt(t_tri)} {fmt(t_graph)} {fmt(t_bf)} {fmt(t_w8)} {sp_bf} {sp_w8} "
              f"{gbs:>10.0f} {gbs / bandwidth:>8.0%} {tops:>6.1f}")

    print("\ntargets:")
    for m, _, _, _, t_graph, _, _, gbs, _ in rows_out:
        if m <= 16:
            frac = gbs / bandwidth
            how = "CUDA graph" if t_graph else "eager"
            print(f"  decode M={m} ({how}): {frac:.0%} of the copy bandwidth (target >= 70%): "
                  f"{'MET' if frac >= 0.70 else 'NOT MET'}")
    for m, _, _, t_tri, _, t_bf, _, _, _ in rows_out:
        if m == 4096 and t_bf:
            speedup = t_bf[1] / t_tri[1]
            print(f"  prefill M=4096: {speedup:.2f}x bf16 (target >= 1.5x): {'MET' if speedup >= 1.5 else 'NOT MET'}")
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")
    print(f"total {time.time() - t0:.0f} s; peak GPU memory {peak:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
