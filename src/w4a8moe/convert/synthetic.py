"""Source checkpoints made on the spot: random Hugging Face MoE models and their DeepSeek FP8 form.

For tests, benchmarks and demos; nothing is downloaded. Models are built by transformers
from a config dict (random init, seeded) and saved with ``save_pretrained``, so their tensor
names and layout are exactly those of real releases.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from w4a8moe.formats.safetensors_io import atomic_save_safetensors
from w4a8moe.convert.source import HF_INDEX_FILE, HF_SINGLE_FILE

FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value."""


def make_hf_checkpoint(config: dict, path: str | Path, seed: int = 0, max_shard_size: str | int = "5GB",
                       outliers: bool = False, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Build a random model of ``config`` with transformers and ``save_pretrained`` it to ``path``.

    With ``outliers`` the model gets the activation and weight outliers real LLMs have, so
    that clipping matters: a few hidden channels of every ``post_attention_layernorm`` are
    scaled up (massive MoE-input channels) and a few input columns of every expert
    projection are scaled up (per-channel int4 scales dominated by a few weights).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    model_type = cfg.pop("model_type")
    cfg.pop("architectures", None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg), dtype=torch.float32)
    if outliers:
        gen = torch.Generator().manual_seed(seed + 1)
        hidden = model.config.hidden_size
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("post_attention_layernorm.weight"):
                    channels = torch.randperm(hidden, generator=gen)[: max(1, hidden // 32)]
                    p[channels] *= 12.0
                elif ".experts." in name and p.dim() >= 2:
                    k = p.shape[-1]
                    cols = torch.randperm(k, generator=gen)[: max(1, k // 16)]
                    p[..., cols] *= 6.0
    model.to(dtype)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.data = (0.05 * torch.randn(buf.shape, generator=torch.Generator().manual_seed(seed + 2))).float()
    path = Path(path)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


def quantize_fp8_blockwise(weight: torch.Tensor, block: tuple[int, int] = (128, 128)
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-style block FP8: ``(float8_e4m3fn [N, K], scale_inv fp32 [ceil(N/bn), ceil(K/bk)])``.

    Each block's scale is ``amax / 448`` (1 for an all-zero block); edge blocks are ragged.
    """
    w = weight.to(torch.float32)
    n, k = w.shape
    bn, bk = block
    gn, gk = -(-n // bn), -(-k // bk)
    padded = torch.zeros(gn * bn, gk * bk)
    padded[:n, :k] = w
    amax = padded.reshape(gn, bn, gk, bk).abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    expanded = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return (w / expanded).to(torch.float8_e4m3fn), scale


def _fp8_target(name: str, tensor: torch.Tensor) -> bool:
    """Which weights DeepSeek ships in FP8: every Linear in the decoder layers except the router."""
    return (tensor.dim() == 2 and name.endswith(".weight") and name.startswith("model.layers.")
            and not name.endswith("mlp.gate.weight") and "layernorm" not in name)


def make_fp8_checkpoint(src: str | Path, dst: str | Path, block: tuple[int, int] = (128, 128)) -> Path:
    """Write the DeepSeek block-FP8 version of the float checkpoint ``src`` to ``dst``.

    Linear weights in the decoder layers (not the router) become float8_e4m3fn with a
    ``weight_scale_inv`` per block; ``config.json`` gains the ``quantization_config`` DeepSeek
    ships (``quant_method: fp8``, ``weight_block_size``). Shard layout follows the source.
    """
    from safetensors import safe_open

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    index_path = src / HF_INDEX_FILE
    if index_path.exists():
        files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    else:
        files = [HF_SINGLE_FILE]
    weight_map: dict[str, str] = {}
    for fname in files:
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(src / fname), framework="pt") as fh:
            for name in fh.keys():
                t = fh.get_tensor(name)
                if _fp8_target(name, t):
                    q, s = quantize_fp8_blockwise(t, block)
                    out[name], out[name + "_scale_inv"] = q, s
                else:
                    out[name] = t
        atomic_save_safetensors(dst / fname, out, {"format": "pt"})
        weight_map.update({n: fname for n in out})
    if index_path.exists():
        (dst / HF_INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for p in src.iterdir():
        if p.is_file() and p.suffix != ".safetensors" and p.name not in ("config.json", HF_INDEX_FILE):
            shutil.copy2(p, dst / p.name)
    return dst
