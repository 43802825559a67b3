"""vLLM offline generation throughput: W4A8 with the plugin vs the same model in bf16 vs load_model.

A DeepSeek-V3-shaped model (real expert shapes H=7168, I=2048, one shared expert; real MLA
head shapes: q_lora_rank 1536, kv_lora_rank 512, rope 64, nope 128, v 128; fewer heads,
layers and experts, small vocab) is built from a config with random weights, saved in bf16
and converted round-to-nearest to W4A8 (compressed-tensors, alpha stored). Decode tokens/s
at batch 1 and 16 are measured in vLLM for both (each engine in its own process, default
compiled mode), and for the project's own ``load_model`` (transformers generate with KV
cache). Target: W4A8 decode at batch 1 >= 2x vLLM bf16.

    .venv-vllm/bin/python bench/bench_vllm.py [--quick] [--out DIR]

Needs ~8 GB free (VLLM_CPU_KVCACHE_SPACE=1); ``--quick`` is a 1-layer, 4-expert model.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def model_config(quick: bool) -> dict:
    from w4a8moe.models.synthetic import tiny_config

    return tiny_config(
        "deepseek_v3", hidden_size=7168, moe_intermediate_size=2048, intermediate_size=2048,
        num_hidden_layers=1 if quick else 2, first_k_dense_replace=0, n_routed_experts=4 if quick else 8,
        num_experts_per_tok=2 if quick else 4, n_group=2 if quick else 4, topk_group=1 if quick else 2,
        num_attention_heads=16, num_key_value_heads=16, q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64,
        qk_nope_head_dim=128, v_head_dim=128, vocab_size=1024, max_position_embeddings=512)


def build(root: Path, quick: bool) -> tuple[Path, Path]:
    """The bf16 source folder and its W4A8 conversion."""
    from transformers import AutoModelForCausalLM

    from w4a8moe.models import export_w4a8_checkpoint
    from w4a8moe.models.export import moe_blocks
    from w4a8moe.models.loading import transformers_config

    cfg = model_config(quick)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(transformers_config(cfg), dtype=torch.bfloat16)
    src, dst = root / "bf16", root / "w4a8"
    model.save_pretrained(src)
    alpha = {i: torch.full((cfg["n_routed_experts"],), 0.8) for i in moe_blocks(model)}
    export_w4a8_checkpoint(model, cfg, dst, fmt="compressed-tensors", alpha=alpha)
    return src, dst


def vllm_tokens_per_s(path: Path, work: Path, batches: list[int], new_tokens: int) -> dict[str, float]:
    from w4a8moe.integrations.vllm.offline import run_in_child

    spec = {"model": str(path), "prompts": [[1 + i, 7, 42, 99, 13, 250, 31, 8] for i in range(16)], "max_tokens": 2,
            "llm": {"max_model_len": 256, "max_num_seqs": 16, "dtype": "bfloat16"},
            "timed_batches": batches, "timed_tokens": new_tokens}
    return run_in_child(spec, work, timeout=1800)["tokens_per_s"]


def project_tokens_per_s(path: Path, batches: list[int], new_tokens: int) -> dict[str, float]:
    from w4a8moe.models import load_model

    model = load_model(path)
    out = {}
    for batch in batches:
        ids = torch.tensor([[1 + i, 7, 42, 99, 13, 250, 31, 8] for i in range(batch)])
        with torch.no_grad():
            model.generate(ids, max_new_tokens=2, do_sample=False)
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        out[str(batch)] = batch * new_tokens / (time.perf_counter() - t0)
    return out


LINEAR_SHAPES = [("q_b_proj", 1536, 16 * 192), ("o_proj", 16 * 128, 7168), ("shared gate_up", 7168, 2 * 2048),
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
    print(f"{'layer':16s} {'K':>6s} {'N':>6s} {'M':>4s} {'w4a8moe':>10s} {'vLLM int8':>12s} {'vLLM/ours':>9s} path")
    for name, k, n in LINEAR_SHAPES:
        w_q, w_s = quantize_int8_per_channel(torch.randn(n, k))
        prepared = backend.prepare_int8_linear(w_q, w_s)
        amx = check_cpu_sgl_kernel(n, k, torch.int8)
        if amx:
            packed = torch.ops._C.convert_weight_packed(w_q)
            scale = w_s.reshape(n).to(torch.float32)
        else:
            handler = vllm_ops.create_onednn_scaled_mm(w_q.t(), w_s.reshape(n, 1), torch.bfloat16, True, False, 32)
        for m in (1, 16):
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
            print(f"{name:16s} {k:6d} {n:6d} {m:4d} {times[0]:10.1f} {times[1]:12.1f} {times[1] / times[0]:9.2f} {'AMX' if amx else 'oneDNN'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="folder for the models (default: a temporary one)")
    parser.add_argument("--linear-only", action="store_true", help="only the W8A8 Linear table")
    args = parser.parse_args()
    linear_table(20 if args.quick else 200)
    if args.linear_only:
        return
    batches = [1, 16]
    new_tokens = 8 if args.quick else 32
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        src, dst = build(root, args.quick)
        rows = {
            "vLLM W4A8 (plugin)": vllm_tokens_per_s(dst, root / "run-w4a8", batches, new_tokens),
            "vLLM bf16": vllm_tokens_per_s(src, root / "run-bf16", batches, new_tokens),
            "w4a8moe load_model": project_tokens_per_s(dst, batches, new_tokens),
        }
    base = rows["vLLM bf16"]
    print(f"decode tokens/s, {new_tokens} new tokens, DeepSeek-V3 shapes ({'quick' if args.quick else 'full'})")
    print(f"{'':22s} {'batch 1':>10s} {'batch 16':>10s} {'x bf16 b1':>10s} {'x bf16 b16':>11s}")
    for name, r in rows.items():
        print(f"{name:22s} {r['1']:10.2f} {r['16']:10.2f} {r['1'] / base['1']:10.2f} {r['16'] / base['16']:11.2f}")


if __name__ == "__main__":
    main()
