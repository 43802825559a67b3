"""vLLM offline generation throughput: W4A8 with the plugin vs the same model in bf16 vs load_model.

    .venv-vllm/bin/python bench/bench_vllm.py                 # 4 layers, batch 1 and 16, 32 new tokens
    .venv-vllm/bin/python bench/bench_vllm.py --quick         # 1 layer, 8 new tokens, one round, one repeat
    .venv-vllm/bin/python bench/bench_vllm.py --workdir DIR   # keep the checkpoints, reuse them next time

The model is :mod:`bench_decode`'s DeepSeek-V3 shape: the real hidden size (7168), MLA
attention (128 heads, q_lora 1536, kv_lora 512, nope/rope/v 128/64/128), routed experts of the
real width (2048), top-8 of 8 routed experts plus the shared one, every layer MoE (so a decode
step reads per layer what DeepSeek-V3's top-8 of 256 reads), ``--layers`` deep, vocabulary
1024. It is built by transformers (random, seeded, bf16), saved, and converted by this
package's converter with round-to-nearest clips (compressed-tensors, ``alpha`` stored).

Decode tokens/s at batch 1 and 16 (8-token prompts) are measured for vLLM with the plugin
(W4A8), vLLM on the bf16 source, each engine in its own process in vLLM's default compiled
mode, and the project's own ``load_model`` (transformers ``generate`` with its KV cache).
vLLM's decode time is a ``--tokens`` generate minus a 1-token generate of the same batch
(prefill cancels), ``load_model``'s is stamped per token; the median of ``--rounds`` rounds
counts, over ``--repeats`` engine starts for vLLM, W4A8 and bf16 alternating (this VM's DRAM
bandwidth changes over minutes; a 2 GiB read probe before each run prints the state). vLLM's worker is bound to all cores (``--vllm-bind``, default ``0-N``; vLLM's own
``auto`` keeps one core for its front end, leaving one worker thread here), ``load_model``
runs on torch's threads (all cores). Target: W4A8 decode at batch 1 >= 2x vLLM bf16.

Peak memory is one engine at a time: about 1.2 GB per layer in bf16 plus ~2 GB for vLLM.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import deepseek_v3_config, mem_available_gb, prepare_checkpoints, timed_generate  # noqa: E402

BATCHES = [1, 16]
GB_PER_BF16_LAYER = 1.2


def dram_read_gb_s() -> float:
    """Best of three sums of a 2 GiB fp32 tensor on torch's threads: the machine's read bandwidth now."""
    x = torch.ones(2**29, dtype=torch.float32)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def prompts(count: int) -> list[list[int]]:
    return [[1 + i, 7, 42, 99, 13, 250, 31, 8] for i in range(count)]


def vllm_decode(path: Path, work: Path, new_tokens: int, rounds: int, bind: str) -> tuple[dict, list[int]]:
    """``{batch: {"decode_tokens_per_s": [...], "prefill_s": [...]}}`` and the greedy tokens of
    the first prompt."""
    from w4a8moe.integrations.vllm.offline import run_in_child

    spec = {"model": str(path), "prompts": prompts(max(BATCHES)), "max_tokens": new_tokens,
            "llm": {"max_model_len": 64, "max_num_seqs": max(BATCHES), "max_num_batched_tokens": 256,
                    "dtype": "bfloat16"},
            "timed_batches": BATCHES, "timed_tokens": new_tokens, "timed_rounds": rounds,
            "env": {"VLLM_CPU_OMP_THREADS_BIND": bind}}
    start = time.perf_counter()
    result = run_in_child(spec, work, timeout=3600)
    print(f"  {path.name}: vLLM start-up {result['startup_s']:.0f} s, whole run {time.perf_counter() - start:.0f} s",
          flush=True)
    return result["timings"], result["outputs"][0]["tokens"]


def project_decode(path: Path, new_tokens: int, rounds: int) -> tuple[dict, list[int]]:
    """As :func:`vllm_decode`, for ``load_model`` in this process."""
    from w4a8moe.models import load_model

    model = load_model(path)
    out, first = {}, []
    for batch in BATCHES:
        ids = torch.tensor(prompts(batch))
        timed_generate(model, ids, 2)  # warm
        rates, prefills = [], []
        for _ in range(rounds):
            prefill, steps_per_s, tokens = timed_generate(model, ids, new_tokens)
            rates.append(batch * steps_per_s)
            prefills.append(prefill)
            first = first or tokens
        out[str(batch)] = {"decode_tokens_per_s": rates, "prefill_s": prefills}
    del model
    return out, first


LINEAR_SHAPES = [("q_b_proj", 1536, 128 * 192), ("o_proj", 128 * 128, 7168), ("shared gate_up", 7168, 2 * 2048),
                 ("shared down", 2048, 7168)]


def linear_table(repeats: int) -> None:
    """W8A8 Linear, per call: the project's int8 kernel (what the plugin uses) vs vLLM's own CPU
    int8 path as ``CPUInt8ScaledMMLinearKernel`` picks it: the AMX kernel where
    ``check_cpu_sgl_kernel`` allows, else oneDNN."""
    from vllm import _custom_ops as vllm_ops
    from vllm.model_executor.layers.utils import check_cpu_sgl_kernel

    from w4a8moe.kernels import get_backend
    from w4a8moe.quant import quantize_int8_per_channel

    backend = get_backend()
    print(f"W8A8 Linear, microseconds per call (backend {backend.name}, {torch.get_num_threads()} threads)")
    print("| layer | K | N | M | w4a8moe | vLLM int8 | vLLM / ours | vLLM path |\n|---|---|---|---|---|---|---|---|")
    for name, k, n in LINEAR_SHAPES:
        w_q, w_s = quantize_int8_per_channel(torch.randn(n, k))
        prepared = backend.prepare_int8_linear(w_q, w_s)
        amx = check_cpu_sgl_kernel(n, k, torch.int8)
        if amx:
            packed = torch.ops._C.convert_weight_packed(w_q)
            scale = w_s.reshape(n).to(torch.float32)
        else:
            handler = vllm_ops.create_onednn_scaled_mm(w_q.t(), w_s.reshape(n, 1), torch.bfloat16, True, False, 32)
        for m in BATCHES:
            x = torch.randn(m, k).to(torch.bfloat16)

            def ours() -> torch.Tensor:
                x_q, x_scale = backend.quantize_per_token(x)
                return backend.int8_linear(prepared, x_q, x_scale)

            def theirs() -> torch.Tensor:
                if amx:
                    return torch.ops._C.int8_scaled_mm_with_quant(x, packed, scale, None, torch.bfloat16, True)
                x_q, x_s, x_zp = vllm_ops.onednn_scaled_int8_quant(x, None, None, True)
                out = torch.empty((m, n), dtype=torch.bfloat16)
                vllm_ops.onednn_scaled_mm(handler, x_q, out, x_s, x_zp, None, None)
                return out

            times = []
            for fn in (ours, theirs):
                fn()
                t0 = time.perf_counter()
                for _ in range(repeats):
                    fn()
                times.append((time.perf_counter() - t0) / repeats * 1e6)
            print(f"| {name} | {k} | {n} | {m} | {times[0]:.1f} | {times[1]:.1f} | {times[1] / times[0]:.2f} "
                  f"| {'AMX' if amx else 'oneDNN'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 layer, 8 new tokens, one round")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers, all MoE (default 4, quick 1)")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per sequence (default 32, quick 8)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per batch (default 3, quick 1)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="engine starts per vLLM model, alternating W4A8 and bf16 (default 2, quick 1)")
    parser.add_argument("--vllm-bind", default=f"0-{os.cpu_count() - 1}",
                        help="VLLM_CPU_OMP_THREADS_BIND of the engines (default: all cores; 'auto': vLLM's choice)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the checkpoints here and reuse them (default: a temporary folder)")
    parser.add_argument("--skip-linear", action="store_true", help="no W8A8 Linear table")
    args = parser.parse_args()
    layers = args.layers or (1 if args.quick else 4)
    new_tokens = args.tokens or (8 if args.quick else 32)
    rounds = args.rounds or (1 if args.quick else 3)
    repeats = args.repeats or (1 if args.quick else 2)
    if new_tokens < 2:
        parser.error("--tokens must be at least 2")
    need = GB_PER_BF16_LAYER * layers + 3
    if mem_available_gb() < need:
        sys.exit(f"about {need:.0f} GB are needed and only {mem_available_gb():.1f} GB are available")
    load = os.getloadavg()
    print(f"# vLLM benchmark: DeepSeek-V3 shapes, {layers} MoE layers of 8 routed experts (top-8) + 1 shared; "
          f"prompt 8 tokens, {new_tokens} new tokens, {rounds} round(s); {os.cpu_count()} CPUs, torch "
          f"{torch.__version__} with {torch.get_num_threads()} threads, vLLM bind {args.vllm_bind!r}, loadavg "
          f"{load[0]:.2f}", flush=True)
    if not args.skip_linear:
        linear_table(20 if args.quick else 200)
    with tempfile.TemporaryDirectory(prefix="w4a8moe-bench-vllm-") as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        src, dst = prepare_checkpoints(deepseek_v3_config(8, layers), root)
        # The VM's DRAM bandwidth changes over minutes: the two engines alternate, and a read
        # probe before each run records the state it ran in.
        rows: dict[str, dict[str, dict[str, list[float]]]] = {}
        tokens: dict[str, list[int]] = {}
        pairs = []
        for rep in range(repeats):
            for name, path in (("vLLM W4A8 (plugin)", dst), ("vLLM bf16", src)):
                probe = dram_read_gb_s()
                timings, tokens[name] = vllm_decode(path, root / f"run-{path.name}-{rep}", new_tokens, rounds,
                                                    args.vllm_bind)
                print(f"  repeat {rep + 1} {name}: DRAM probe before {probe:.1f} GB/s, batch 1 "
                      f"{statistics.median(timings['1']['decode_tokens_per_s']):.2f} tokens/s", flush=True)
                for batch, t in timings.items():
                    for key, values in t.items():
                        rows.setdefault(name, {}).setdefault(batch, {}).setdefault(key, []).extend(values)
                pairs.append(statistics.median(timings["1"]["decode_tokens_per_s"]))
        probe = dram_read_gb_s()
        rows["w4a8moe load_model"], tokens["w4a8moe load_model"] = project_decode(dst, new_tokens, rounds)
        print(f"  load_model: DRAM probe before {probe:.1f} GB/s", flush=True)

    def median(name: str, batch: int, key: str = "decode_tokens_per_s") -> float:
        return statistics.median(rows[name][str(batch)][key])

    per_repeat = [pairs[i] / pairs[i + 1] for i in range(0, len(pairs), 2)]
    print(f"\ndecode tokens/s (vLLM: median of {rounds} rounds x {repeats} engine starts; load_model: {rounds} "
          f"rounds), {layers} layers, {new_tokens} new tokens; batch-1 W4A8 / bf16 per repeat: "
          + ", ".join(f"{r:.2f}x" for r in per_repeat))
    print("| engine | batch 1 tokens/s | batch 16 tokens/s | batch 1 vs vLLM bf16 | batch 16 vs vLLM bf16 "
          "| prefill b1 / b16 ms |\n|---|---|---|---|---|---|")
    for name in rows:
        rel = [median(name, b) / median("vLLM bf16", b) for b in BATCHES]
        print(f"| {name} | {median(name, 1):.2f} | {median(name, 16):.2f} | {rel[0]:.2f}x | {rel[1]:.2f}x "
              f"| {median(name, 1, 'prefill_s') * 1e3:.0f} / {median(name, 16, 'prefill_s') * 1e3:.0f} |")
    # A sanity check on the served model (not a tolerance test: a random model has near ties).
    same = sum(a == b for a, b in zip(tokens["vLLM W4A8 (plugin)"], tokens["w4a8moe load_model"]))
    print(f"\ngreedy tokens of the first prompt, vLLM W4A8 equal to load_model's: {same} of {new_tokens}")
    ratio = median("vLLM W4A8 (plugin)", 1) / median("vLLM bf16", 1)
    print(f"\ntarget W4A8 decode at batch 1 >= 2x vLLM bf16: {'PASS' if ratio >= 2 else 'FAIL'} ({ratio:.2f}x); "
          f"loadavg after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
