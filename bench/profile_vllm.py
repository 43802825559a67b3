"""Where a vLLM decode step's time goes: torch-profile one greedy generate and sum the ops.

    .venv-vllm/bin/python bench/profile_vllm.py MODEL_DIR [--batch 1] [--tokens 16] [--out DIR]

MODEL_DIR is a checkpoint ``bench_vllm.py --workdir DIR`` kept (``DIR/w4a8`` or ``DIR/bf16``).
The engine runs in vLLM's default compiled mode, its worker bound to all cores; after a warm
generate, one generate of ``--tokens`` tokens is profiled by vLLM's torch profiler (its
trace lands in ``--out``), and the time of each op family below is printed per decode step
(per ``execute_model`` call).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import tempfile
import time

# Op families (trace event names) and what they are in a DeepSeek-V3 step.
FAMILIES = {
    "w4a8moe::moe_experts": "plugin: routing + routed experts",
    "_C::cpu_fused_moe": "vLLM bf16 routed experts",
    "w4a8moe::int8_linear": "plugin: W8A8 Linears",
    "_C::onednn_mm": "vLLM bf16 Linears (oneDNN)",
    "_C::onednn_scaled_mm": "vLLM int8 Linears (oneDNN)",
    "aten::bmm": "MLA absorbed bmm (inclusive)",
    "aten::clone": "copies to contiguous (in bmm)",
    "_C::mla_decode_kvcache": "MLA decode attention",
}


def per_step(trace_dir: str) -> tuple[dict[str, float], float, int]:
    """``({family: ms per step}, ms per step, steps)`` from the trace in ``trace_dir``."""
    path = glob.glob(os.path.join(trace_dir, "*.trace.json.gz"))[0]
    events = [e for e in json.load(gzip.open(path))["traceEvents"] if e.get("ph") == "X"]
    total = collections.Counter()
    steps, step_us = 0, 0.0
    for e in events:
        if e["name"] in FAMILIES:
            total[e["name"]] += e["dur"]
        elif "gpu_model_runner.py" in e["name"] and "execute_mo" in e["name"]:
            steps += 1
            step_us += e["dur"]
    steps = max(steps, 1)
    return {k: total[k] / 1e3 / steps for k in FAMILIES}, step_us / 1e3 / steps, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--out", default=None, help="trace folder (default: a temporary one)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    out = args.out or tempfile.mkdtemp(prefix="w4a8moe-profile-vllm-")
    llm = LLM(model=args.model, skip_tokenizer_init=True, seed=0, max_model_len=64, max_num_seqs=max(16, args.batch),
              max_num_batched_tokens=256, dtype="bfloat16",
              profiler_config={"profiler": "torch", "torch_profiler_dir": out})
    prompts = [TokensPrompt(prompt_token_ids=[1 + i, 7, 42, 99, 13, 250, 31, 8]) for i in range(args.batch)]
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True, detokenize=False)
    llm.generate(prompts, params, use_tqdm=False)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    plain = time.perf_counter() - start
    llm.start_profile()
    llm.generate(prompts, params, use_tqdm=False)
    llm.stop_profile()
    deadline = time.time() + 120  # the worker writes the trace after stop_profile returns
    while not glob.glob(os.path.join(out, "*.trace.json.gz")) and time.time() < deadline:
        time.sleep(1)
    time.sleep(5)
    families, step_ms, steps = per_step(out)
    print(f"{args.model}: batch {args.batch}, {args.tokens} tokens in {plain:.2f} s unprofiled; "
          f"{steps} steps profiled, {step_ms:.1f} ms per step; trace in {out}")
    for name, ms in families.items():
        if ms:
            print(f"  {FAMILIES[name]:40s} {ms:7.1f} ms/step  ({name})")


if __name__ == "__main__":
    main()
