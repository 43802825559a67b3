"""Write W4A8 checkpoints in either format from float or quantized MoE layers."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from w4a8moe.formats import ascendv1, compressed_tensors
from w4a8moe.formats.layer_tensors import FloatMoELayer, QuantizedMoELayer, quantize_moe_layer
from w4a8moe.formats.model_config import EXPERT_PROJECTIONS, MoEModelConfig
from w4a8moe.formats.safetensors_io import ShardedSafetensorsWriter, atomic_write_json
from w4a8moe.formats.schema import (
    ASCENDV1,
    COMPRESSED_TENSORS,
    FORMATS,
    expert_projection_tensors,
    w8a8_linear_tensors,
)
from w4a8moe.quant import quantize_int8_per_channel


def moe_layer_tensors(
    fmt: str, model_config: MoEModelConfig, layer: int, q: QuantizedMoELayer, with_alpha: bool
) -> dict[str, tuple[torch.Tensor, str]]:
    """Every tensor of one quantized MoE block as ``name -> (tensor, AscendV1 type)``."""
    names = model_config.names
    prefix = names.layer_prefix(layer)
    out: dict[str, tuple[torch.Tensor, str]] = {
        f"{prefix}.{names.router}.weight": (q.router_weight.to(torch.bfloat16), ascendv1.FLOAT)
    }
    if q.correction_bias is not None:
        out[f"{prefix}.{names.router}.e_score_correction_bias"] = (q.correction_bias.to(torch.float32), ascendv1.FLOAT)
    for expert in range(q.num_experts):
        for proj in EXPERT_PROJECTIONS:
            base = names.expert_weight(layer, expert, proj)
            alpha = q.alpha[expert] if with_alpha else None
            tensors = expert_projection_tensors(fmt, proj, q.packed[proj][expert], q.scale[proj][expert], alpha)
            for suffix, t in tensors.items():
                out[f"{base}.{suffix}"] = (t, ascendv1.W4A8)
    if q.shared is not None:
        for proj in EXPERT_PROJECTIONS:
            base = names.shared_weight(layer, proj)
            weight, scale = q.shared[proj]
            if scale is None:
                out[f"{base}.weight"] = (weight.to(torch.bfloat16), ascendv1.FLOAT)
            else:
                for suffix, t in w8a8_linear_tensors(fmt, weight, scale).items():
                    out[f"{base}.{suffix}"] = (t, ascendv1.W8A8_DYNAMIC)
        if q.shared_expert_gate is not None:
            out[f"{prefix}.{names.shared_gate}.weight"] = (q.shared_expert_gate.to(torch.bfloat16), ascendv1.FLOAT)
    return out


def _ignore_entry(name: str) -> str | None:
    """The compressed-tensors ``ignore`` entry for a float 2-D weight, if it is a Linear."""
    if not name.endswith(".weight") or "embed_tokens" in name or "norm" in name:
        return None
    return name[: -len(".weight")]


def write_checkpoint(
    path: str | Path,
    config: dict,
    moe_layers: dict[int, FloatMoELayer | QuantizedMoELayer],
    fmt: str = COMPRESSED_TENSORS,
    other_tensors: dict[str, torch.Tensor] | None = None,
    w8a8_linears: dict[str, torch.Tensor] | None = None,
    shared_format: str = "w8a8",
    activation_use_clip: bool | None = None,
    max_shard_bytes: int = 4 << 30,
    copy_files: list[Path] | None = None,
) -> Path:
    """Write a W4A8 checkpoint of format ``fmt`` (``"compressed-tensors"`` or ``"ascendv1"``).

    ``moe_layers`` maps layer index to a float layer (quantized here, with its weight and
    activation clips) or to an already quantized one. ``other_tensors`` are written as they
    are (embeddings, norms, attention kept in bf16, ...); ``w8a8_linears`` maps a Linear's
    ``weight`` name to its float weight, quantized to W8A8 dynamic. ``activation_use_clip``
    defaults to True for compressed-tensors (alphas written) and is always False for
    AscendV1, which has no clip. Shards and metadata files are written atomically; the
    index is written last. Returns ``path``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model_config = MoEModelConfig.from_dict(config)
    if fmt == ASCENDV1:
        if activation_use_clip:
            raise ValueError("the AscendV1 format has no activation clip; use compressed-tensors")
        activation_use_clip = False
    elif activation_use_clip is None:
        activation_use_clip = True
    prefix = ascendv1.WEIGHTS_PREFIX if fmt == ASCENDV1 else compressed_tensors.WEIGHTS_PREFIX
    index = ascendv1.INDEX_FILE if fmt == ASCENDV1 else compressed_tensors.INDEX_FILE
    writer = ShardedSafetensorsWriter(path, prefix, index, max_shard_bytes)
    types: dict[str, str] = {}
    ignore: list[str] = []

    def add(name: str, tensor: torch.Tensor, kind: str) -> None:
        writer.add(name, tensor)
        types[name] = kind

    for layer_idx in sorted(moe_layers):
        layer = moe_layers[layer_idx]
        q = layer if isinstance(layer, QuantizedMoELayer) else quantize_moe_layer(layer, shared_format)
        for name, (tensor, kind) in moe_layer_tensors(fmt, model_config, layer_idx, q, activation_use_clip).items():
            add(name, tensor, kind)
            if kind == ascendv1.FLOAT and tensor.dim() == 2 and (entry := _ignore_entry(name)):
                ignore.append(entry)
    for name, weight in sorted((w8a8_linears or {}).items()):
        wq, s = quantize_int8_per_channel(weight)
        base = name[: -len(".weight")]
        for suffix, t in w8a8_linear_tensors(fmt, wq, s).items():
            add(f"{base}.{suffix}", t, ascendv1.W8A8_DYNAMIC)
    for name, tensor in sorted((other_tensors or {}).items()):
        add(name, tensor, ascendv1.FLOAT)
        if tensor.dim() == 2 and (entry := _ignore_entry(name)):
            ignore.append(entry)
    writer.close()

    out_config = dict(config)
    out_config.pop("quantization_config", None)
    if fmt == ASCENDV1:
        atomic_write_json(path / ascendv1.DESCRIPTION_FILE, ascendv1.build_description(types, {"producer": "w4a8moe"}))
    else:
        out_config["quantization_config"] = compressed_tensors.build_quantization_config(activation_use_clip, ignore)
    atomic_write_json(path / "config.json", out_config)
    for src in copy_files or []:
        shutil.copy2(src, path / Path(src).name)
    return path

