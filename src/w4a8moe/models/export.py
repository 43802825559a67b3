"""From an in-memory transformers MoE model to the writer's inputs (round-to-nearest export).

This is the plumbing between transformers 5 modules (experts fused as ``gate_up_proj
[E, 2I, H]`` and ``down_proj [E, H, I]``) and :func:`~w4a8moe.formats.write_checkpoint`
(per-layer :class:`~w4a8moe.formats.FloatMoELayer`). The quantization itself happens in the
writer. Used by the tests (random models of every family) and by ``w4a8moe eval`` for its
round-to-nearest baseline; the converter (``w4a8moe convert``) is the full tool, with
calibration and learned clips.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from w4a8moe.formats import CheckpointFormat, FloatMoELayer, MoEModelConfig, write_checkpoint

MLA_FLOAT_PROJECTIONS = ("q_a_proj", "kv_a_proj_with_mqa", "kv_b_proj")
"""DeepSeek MLA projections the upstream checkpoints keep in bf16 (SPEC 1); ``q_b_proj`` is W8A8."""


def default_w8a8_policy(name: str, module: nn.Module) -> bool:
    """Upstream policy: decoder-layer Linears are W8A8, except routers and MLA a/b projections.

    Embeddings, norms and ``lm_head`` are not in decoder layers and stay bf16.
    """
    if not isinstance(module, nn.Linear) or not name.startswith("model.layers."):
        return False
    leaf = name.rsplit(".", 1)[-1]
    return leaf not in MLA_FLOAT_PROJECTIONS and leaf not in ("gate", "shared_expert_gate")


def moe_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """Layer index -> transformers MoE block (a ``decoder_layer.mlp`` with ``experts`` and ``gate``)."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and hasattr(mlp, "experts") and hasattr(mlp, "gate"):
            out[i] = mlp
    return out


def float_moe_layer(block: nn.Module, model_config: MoEModelConfig) -> FloatMoELayer:
    """The float tensors of one transformers MoE block, split per projection."""
    experts = block.experts
    inter = model_config.moe_intermediate_size
    gate_up = experts.gate_up_proj.detach().to(torch.float32)
    shared = None
    shared_gate = None
    names = model_config.names
    if names.shared is not None:
        shared_mod = getattr(block, names.shared)
        shared = {p: getattr(shared_mod, f"{p}_proj").weight.detach().to(torch.float32) for p in ("gate", "up", "down")}
        if names.shared_gate:
            shared_gate = getattr(block, names.shared_gate).weight.detach().to(torch.bfloat16)
    correction = getattr(block.gate, "e_score_correction_bias", None)
    return FloatMoELayer(
        router_weight=block.gate.weight.detach().to(torch.bfloat16),
        experts={
            "gate": gate_up[:, :inter].contiguous(),
            "up": gate_up[:, inter:].contiguous(),
            "down": experts.down_proj.detach().to(torch.float32),
        },
        correction_bias=correction.detach().to(torch.float32) if model_config.routing.method == "noaux_tc" else None,
        shared=shared,
        shared_expert_gate=shared_gate,
    )


def export_w4a8_checkpoint(
    model: nn.Module,
    config: dict,
    path: str | Path,
    fmt: str | CheckpointFormat = "compressed-tensors",
    w8a8_policy: Callable[[str, nn.Module], bool] | None = default_w8a8_policy,
    alpha: dict[int, torch.Tensor] | None = None,
    weight_clip: dict[int, dict[str, torch.Tensor]] | None = None,
    activation_use_clip: bool | None = None,
    copy_files: list[Path] | None = None,
) -> Path:
    """Write ``model`` as a W4A8 checkpoint: round-to-nearest int4 experts unless clips are given.

    ``w8a8_policy(name, module)`` says which Linears become W8A8 (``None``: none, all bf16);
    shared experts follow it too. ``alpha[L]`` / ``weight_clip[L]`` are per-layer activation
    and weight clips (default: none). Returns ``path``.
    """
    mc = MoEModelConfig.from_dict(config)
    blocks = moe_blocks(model)
    shared_w8a8 = w8a8_policy is not None
    layers: dict[int, FloatMoELayer] = {}
    skip_prefixes = []
    for index, block in blocks.items():
        layer = float_moe_layer(block, mc)
        if alpha is not None:
            layer.alpha = alpha[index]
        if weight_clip is not None:
            layer.weight_clip = weight_clip[index]
        layers[index] = layer
        skip_prefixes.append(f"model.layers.{index}.mlp.")
    w8a8: dict[str, torch.Tensor] = {}
    w8a8_modules = set()
    if w8a8_policy is not None:
        for name, module in model.named_modules():
            if any(name.startswith(p) for p in skip_prefixes):
                continue
            if w8a8_policy(name, module):
                w8a8[f"{name}.weight"] = module.weight.detach().to(torch.float32)
                w8a8_modules.add(name)
    other: dict[str, torch.Tensor] = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if name.rpartition(".")[0] in w8a8_modules and name.endswith(".weight"):
            continue
        if tied and name == "lm_head.weight":
            continue
        other[name] = tensor.detach().to(torch.float32 if tensor.dtype == torch.float32 else torch.bfloat16)
    out_config = dict(config)
    return write_checkpoint(
        path, out_config, layers, fmt, other_tensors=other, w8a8_linears=w8a8,
        shared_format="w8a8" if shared_w8a8 else "bf16", activation_use_clip=activation_use_clip,
        copy_files=copy_files,
    )
