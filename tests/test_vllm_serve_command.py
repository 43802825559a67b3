"""``w4a8moe serve``: the vLLM server command line it builds (no vLLM needed to build it)."""

from __future__ import annotations

import argparse

from tests.conftest import random_hf_model
from w4a8moe.integrations.vllm import serve
from w4a8moe.models import export_w4a8_checkpoint


def test_server_command(tmp_path, monkeypatch):
    model, cfg = random_hf_model("qwen3_moe", seed=0)
    path = export_w4a8_checkpoint(model, cfg, tmp_path / "ckpt", fmt="ascendv1")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args([str(path), "--port", "9100", "--tensor-parallel-size", "2", "--enable-expert-parallel",
                              "--no-alpha", "--vllm-args", "--seed 3"])
    cmd, env = serve.server_command(args)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cmd)
    for piece in ("--port 9100", "--quantization w4a8moe", "--tensor-parallel-size 2", "--enable-expert-parallel",
                  "--skip-tokenizer-init", "--seed 3"):
        assert piece in joined
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["W4A8MOE_APPLY_ALPHA"] == "0"
    assert len(env["VLLM_CPU_OMP_THREADS_BIND"].split("|")) == 2
