"""Benchmark: end-to-end greedy decode, a W4A8 checkpoint against the same model in bf16.

    python bench/bench_decode.py            # 2 layers, 16 experts, 32 new tokens, 3 rounds
    python bench/bench_decode.py --quick    # 8 new tokens, 1 round

The model is DeepSeek-V3 shaped where it matters for speed: the real hidden size (7168), MLA
attention (128 heads, q_lora 1536, kv_lora 512, nope/rope/v 128/64/128), routed experts of the
real width (2048) with top-8 of fewer experts (16 by default, in 8 groups, 4 chosen) and one
shared expert, every layer MoE. The vocabulary (1024) and the depth are small so that it fits
in memory (about 5.5 GB peak in all). It is built from a config by transformers (random,
seeded, bf16), saved, converted by this package's converter with round-to-nearest clips into a
temporary folder, and loaded twice in one process: ``w4a8moe.load_model`` (W4A8 experts on the
native kernel, W8A8 and bf16 attention projections as the converter chose) and
``transformers.AutoModelForCausalLM.from_pretrained`` in bf16. Both decode the same prompt with
``generate(do_sample=False)``, alternating in rounds; each step is timed from transformers'
stopping-criteria calls, so prefill (the first token) and decode are apart. The table gives
decode tokens/s (median over rounds) and the W4A8 / bf16 ratio.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PEAK_GB_ESTIMATE = 5.5


def deepseek_v3_config(experts: int, layers: int) -> dict:
    """A DeepSeek-V3 ``config.json`` at the real hidden, attention and expert widths, with
    ``experts`` routed experts (top-8 in 8 groups, 4 chosen), ``layers`` MoE layers, a small vocabulary."""
    from w4a8moe.models.synthetic import tiny_config

    return tiny_config(
        "deepseek_v3", hidden_size=7168, moe_intermediate_size=2048, intermediate_size=18432,
        n_routed_experts=experts, num_experts_per_tok=8, n_group=8, topk_group=4, n_shared_experts=1,
        first_k_dense_replace=0, num_hidden_layers=layers, num_attention_heads=128, num_key_value_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        vocab_size=1024, max_position_embeddings=4096, initializer_range=0.02)


def build_source(config: dict, path: Path, seed: int) -> int:
    """A random bf16 model of ``config`` (initialised in bf16: no fp32 copy) saved to ``path``;
    returns its parameter count."""
    from transformers import AutoModelForCausalLM

    from w4a8moe.models.loading import transformers_config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(transformers_config(config), dtype=torch.bfloat16)
    count = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path, max_shard_size="2GB")
    del model
    gc.collect()
    return count


class StepClock:
    """A stopping criterion that never stops and stamps the time of every generated token."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def timed_generate(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, list[int]]:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens: (prefill s, decode tokens/s, tokens)."""
    from transformers import StoppingCriteriaList

    clock = StepClock()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([clock]), pad_token_id=0)
    prefill = clock.stamps[0] - start
    decode_rate = (len(clock.stamps) - 1) / (clock.stamps[-1] - clock.stamps[0])
    return prefill, decode_rate, out[0, prompt.shape[1]:].tolist()


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024**2
    return float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 new tokens, one round")
    parser.add_argument("--experts", type=int, default=16, help="routed experts per layer (default 16)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers, all MoE (default 2)")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per generate (default 32, quick 8)")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 64, quick 16)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3, quick 1)")
    args = parser.parse_args()
    new_tokens = args.tokens or (8 if args.quick else 32)
    prompt_len = args.prompt or (16 if args.quick else 64)
    rounds = args.rounds or (1 if args.quick else 3)
    if new_tokens < 2:
        parser.error("--tokens must be at least 2 (the first token is the prefill)")
    available = mem_available_gb()
    if available < PEAK_GB_ESTIMATE + 1:
        sys.exit(f"about {PEAK_GB_ESTIMATE} GB are needed and only {available:.1f} GB are available")

    from transformers import AutoModelForCausalLM

    import w4a8moe
    from w4a8moe.convert import convert

    config = deepseek_v3_config(args.experts, args.layers)
    load = os.getloadavg()
    print(f"# w4a8moe end-to-end decode benchmark {'(quick)' if args.quick else ''}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, loadavg {load[0]:.2f}; model: DeepSeek-V3 "
          f"shapes, {args.layers} MoE layers, {args.experts} routed experts (top-8) + 1 shared, vocab "
          f"{config['vocab_size']}; prompt {prompt_len} tokens, {new_tokens} new tokens, {rounds} round(s)")
    with tempfile.TemporaryDirectory(prefix="w4a8moe-bench-decode-") as tmp:
        src, dst = Path(tmp) / "bf16", Path(tmp) / "w4a8"
        start = time.perf_counter()
        params = build_source(config, src, seed=0)
        print(f"built and saved the bf16 model: {params / 1e9:.2f} B parameters in {time.perf_counter() - start:.0f} s",
              flush=True)
        start = time.perf_counter()
        convert(src, dst, learn=False, progress=False)
        size = sum(f.stat().st_size for f in dst.iterdir() if f.suffix == ".safetensors")
        print(f"converted (round-to-nearest) in {time.perf_counter() - start:.0f} s: {size / 1e9:.2f} GB", flush=True)
        gc.collect()
        models = {
            "bf16 (transformers)": AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval(),
            "w4a8 (w4a8moe.load_model)": w4a8moe.load_model(dst),
        }
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, config["vocab_size"], (1, prompt_len), generator=g)
    for model in models.values():  # warm: kernel build, scratch, tables
        timed_generate(model, prompt[:, :4], 2)
    rates: dict[str, list[float]] = {name: [] for name in models}
    prefills: dict[str, list[float]] = {name: [] for name in models}
    tokens: dict[str, list[int]] = {}
    for r in range(rounds):
        for name, model in models.items():
            prefill, rate, out = timed_generate(model, prompt, new_tokens)
            rates[name].append(rate)
            prefills[name].append(prefill)
            tokens[name] = out
            print(f"  round {r + 1}: {name:26s} prefill {prefill * 1e3:8.1f} ms, decode {rate:6.2f} tokens/s",
                  flush=True)
    names = list(models)
    base = statistics.median(rates[names[0]])
    print(f"\n| model | prefill ({prompt_len} tokens) ms | decode tokens/s (median) | best | vs bf16 |")
    print("|---|---|---|---|---|")
    for name in names:
        med = statistics.median(rates[name])
        print(f"| {name} | {statistics.median(prefills[name]) * 1e3:.0f} | {med:.2f} | {max(rates[name]):.2f} "
              f"| {med / base:.2f}x |")
    same = sum(a == b for a, b in zip(tokens[names[0]], tokens[names[1]]))
    load = os.getloadavg()
    print(f"\ngreedy tokens equal to bf16's: {same} of {new_tokens} (a random model: near-ties are common); "
          f"loadavg after {load[0]:.2f}; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.1f} GB")


if __name__ == "__main__":
    main()
