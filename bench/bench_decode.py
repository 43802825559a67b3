"""Benchmark: end-to-end greedy decode, a W4A8 checkpoint against the same model in bf16.

    python bench/bench_decode.py            # 2 layers, 8 routed experts, 32 new tokens, 3 rounds
    python bench/bench_decode.py --quick    # 8 new tokens, 1 round
    python bench/bench_decode.py --workdir /tmp/decode   # keep the checkpoints, reuse them next time

The model is DeepSeek-V3 shaped where it matters for speed: the real hidden size (7168), MLA
attention (128 heads, q_lora 1536, kv_lora 512, nope/rope/v 128/64/128), routed experts of the
real width (2048), top-8, and one shared expert, every layer MoE. The vocabulary (1024), the
depth (2 layers) and the number of routed experts (8, all of them chosen for every token) are
small so that both models fit in memory (about 5.5 GB peak); a decode step still reads what
DeepSeek-V3's top-8 of 256 reads per layer: 8 experts, the shared one and the attention.
``--experts 16`` (or 32: 8 groups, 4 chosen) gives realistic routing at about 8.7 GB (16).
It is built from a config by transformers (random,
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
    ``experts`` routed experts (top-8; in 8 groups of which 4 are chosen where ``experts`` is a
    multiple of 16, else one group), ``layers`` MoE layers and a small vocabulary."""
    from w4a8moe.models.synthetic import tiny_config

    grouped = experts % 16 == 0
    return tiny_config(
        "deepseek_v3", hidden_size=7168, moe_intermediate_size=2048, intermediate_size=18432,
        n_routed_experts=experts, num_experts_per_tok=8, n_group=8 if grouped else 1,
        topk_group=4 if grouped else 1, n_shared_experts=1,
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


def rss_peak_gb(reset: bool = False) -> float:
    """This process's peak RSS (``VmHWM``) in GB; ``reset`` starts a new peak from here."""
    peak = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024**2
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    return peak


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024**2
    return float("inf")


def prepare_checkpoints(config: dict, workdir: Path) -> tuple[Path, Path]:
    """The bf16 source and its W4A8 conversion in ``workdir``, made unless already there for
    this very config (so that ``--workdir`` runs after the first skip both steps)."""
    import json

    from w4a8moe.convert import convert

    src, dst, stamp = workdir / "bf16", workdir / "w4a8", workdir / "bench-config.json"
    wanted = json.dumps(config, sort_keys=True)
    if stamp.exists() and stamp.read_text() == wanted and (dst / "config.json").exists():
        print(f"reusing the checkpoints in {workdir}")
        return src, dst
    for stale in (stamp, src, dst):
        if stale.is_dir():
            import shutil

            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    rss_peak_gb(reset=True)
    start = time.perf_counter()
    params = build_source(config, src, seed=0)
    print(f"built and saved the bf16 model: {params / 1e9:.2f} B parameters in {time.perf_counter() - start:.0f} s, "
          f"peak RSS {rss_peak_gb(reset=True):.1f} GB", flush=True)
    start = time.perf_counter()
    convert(src, dst, learn=False, progress=False)
    size = sum(f.stat().st_size for f in dst.iterdir() if f.suffix == ".safetensors")
    gc.collect()
    print(f"converted (round-to-nearest) in {time.perf_counter() - start:.0f} s: {size / 1e9:.2f} GB, "
          f"peak RSS {rss_peak_gb(reset=True):.1f} GB", flush=True)
    stamp.write_text(wanted)
    return src, dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 new tokens, one round")
    parser.add_argument("--experts", type=int, default=8,
                        help="routed experts per layer (default 8, all chosen; 16: ~8.7 GB peak)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers, all MoE (default 2)")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per generate (default 32, quick 8)")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 64, quick 16)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3, quick 1)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the two checkpoints here and reuse them in later runs (default: a temporary "
                             "folder, removed at the end)")
    args = parser.parse_args()
    new_tokens = args.tokens or (8 if args.quick else 32)
    prompt_len = args.prompt or (16 if args.quick else 64)
    rounds = args.rounds or (1 if args.quick else 3)
    if new_tokens < 2:
        parser.error("--tokens must be at least 2 (the first token is the prefill)")
    if args.experts < 8 or args.layers < 1:
        parser.error("--experts must be at least 8 (top-8 routing) and --layers at least 1")
    available = mem_available_gb()
    if available < PEAK_GB_ESTIMATE + 1:
        sys.exit(f"about {PEAK_GB_ESTIMATE} GB are needed and only {available:.1f} GB are available")

    from transformers import AutoModelForCausalLM

    import w4a8moe

    config = deepseek_v3_config(args.experts, args.layers)
    load = os.getloadavg()
    print(f"# w4a8moe end-to-end decode benchmark {'(quick)' if args.quick else ''}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, loadavg {load[0]:.2f}; model: DeepSeek-V3 "
          f"shapes, {args.layers} MoE layers, {args.experts} routed experts (top-8) + 1 shared, vocab "
          f"{config['vocab_size']}; prompt {prompt_len} tokens, {new_tokens} new tokens, {rounds} round(s)")
    with tempfile.TemporaryDirectory(prefix="w4a8moe-bench-decode-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        src, dst = prepare_checkpoints(config, workdir)
        rss_peak_gb(reset=True)
        models = {
            "bf16 (transformers)": AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval(),
            "w4a8 (w4a8moe.load_model)": w4a8moe.load_model(dst),
        }
        print(f"loaded both models: peak RSS {rss_peak_gb(reset=True):.1f} GB", flush=True)
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
          f"loadavg after {load[0]:.2f}; peak RSS while generating {rss_peak_gb():.1f} GB, over the whole run "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.1f} GB")


if __name__ == "__main__":
    main()
