"""Offline greedy generation with vLLM in a child process: tokens, logprobs and timings as JSON.

Used by the tests and ``bench/bench_vllm.py``: each engine runs in its own process (vLLM
engines hold gigabytes and worker processes; a child exits with all of them), started as
``python -m w4a8moe.integrations.vllm.offline SPEC.json OUT.json``.

``SPEC`` keys: ``model``; ``prompts`` (lists of token ids); ``max_tokens``; ``llm`` (keyword
arguments of ``vllm.LLM``); ``prompt_logprobs`` (bool); ``env`` (environment for the engine);
optionally ``timed_batches`` (batch sizes), ``timed_tokens`` (default 32) and ``timed_rounds``
(default 1): greedy decode of that many tokens per sequence, timed as the difference between
a 1-token and a ``timed_tokens``-token generate of the same batch (so the prefill cancels),
giving ``timings[batch] = {"decode_tokens_per_s": [one per round], "prefill_s": [...]}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}


def run_in_child(spec: dict, workdir: str | Path, timeout: float = 900, python: str | None = None) -> dict:
    """Run ``spec`` in a child process and return its JSON result; raise ``RuntimeError``
    carrying the child's log tail when the engine fails."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = workdir / "spec.json", workdir / "out.json"
    spec_path.write_text(json.dumps(spec))
    if out_path.exists():
        out_path.unlink()
    env = {**os.environ, **DEFAULT_ENV, **{k: str(v) for k, v in spec.get("env", {}).items()}}
    proc = subprocess.run([python or sys.executable, "-m", "w4a8moe.integrations.vllm.offline", str(spec_path),
                           str(out_path)], env=env, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    (workdir / "log.txt").write_text(log)
    if proc.returncode != 0 or not out_path.exists():
        # The cause (e.g. a CheckpointError naming the tensor) sits above vLLM's shutdown noise.
        causes = [line for line in log.splitlines() if "Error" in line or "tensor '" in line][:40]
        raise RuntimeError(f"vLLM run failed (exit {proc.returncode}):\n" + "\n".join(causes)
                           + f"\n... log tail:\n{log[-3000:]}")
    return json.loads(out_path.read_text())


def _main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(Path(spec_path).read_text())
    start = time.perf_counter()
    llm = LLM(model=spec["model"], skip_tokenizer_init=True, seed=0, **spec.get("llm", {}))
    result: dict = {"startup_s": time.perf_counter() - start}
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 8), logprobs=1, detokenize=False,
                            ignore_eos=True,
                            prompt_logprobs=1 if spec.get("prompt_logprobs") else None)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params, use_tqdm=False)
    records = []
    for prompt, out in zip(spec["prompts"], outs):
        gen = out.outputs[0]
        rec = {"tokens": list(gen.token_ids),
               "logprobs": [float(step[t].logprob) for t, step in zip(gen.token_ids, gen.logprobs)]}
        if spec.get("prompt_logprobs"):
            rec["prompt_logprobs"] = [None if step is None else float(step[t].logprob)
                                      for t, step in zip(prompt, out.prompt_logprobs)]
        records.append(rec)
    result["outputs"] = records
    timings = {}
    for batch in spec.get("timed_batches", []):
        n_new = spec.get("timed_tokens", 32)
        prompts = [TokensPrompt(prompt_token_ids=spec["prompts"][i % len(spec["prompts"])]) for i in range(batch)]
        one, many = (SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
                     for n in (1, n_new))
        llm.generate(prompts, many, use_tqdm=False)  # warm: this batch's shapes
        rates, prefills = [], []
        for _ in range(spec.get("timed_rounds", 1)):
            t0 = time.perf_counter()
            llm.generate(prompts, one, use_tqdm=False)
            t1 = time.perf_counter()
            llm.generate(prompts, many, use_tqdm=False)
            t2 = time.perf_counter()
            prefills.append(t1 - t0)
            rates.append(batch * (n_new - 1) / ((t2 - t1) - (t1 - t0)))
        timings[str(batch)] = {"decode_tokens_per_s": rates, "prefill_s": prefills}
    result["timings"] = timings
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
