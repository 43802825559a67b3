"""Write W4A8 checkpoints in either format from float or quantized MoE layers."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from w4a8moe.formats.base import FLOAT, W4A8_DYNAMIC, W8A8_DYNAMIC, CheckpointFormat
from w4a8moe.formats.layer_tensors import FloatMoELayer, QuantizedMoELayer, quantize_moe_layer
from w4a8moe.formats.model_config import EXPERT_PROJECTIONS, MoEModelConfig
from w4a8moe.formats.registry import get_format
from w4a8moe.formats.safetensors_io import ShardedSafetensorsWriter, atomic_copy_file, atomic_write_json
from w4a8moe.quant import quantize_int8_per_channel


def moe_layer_tensors(
    fmt: str | CheckpointFormat, model_config: MoEModelConfig, layer: int, q: QuantizedMoELayer, with_alpha: bool
) -> dict[str, tuple[torch.Tensor, str]]:
    """Every tensor of one quantized MoE block as ``name -> (tensor, role)`` in format ``fmt``.

    The role is ``FLOAT``, ``W8A8_DYNAMIC`` or ``W4A8_DYNAMIC`` (the AscendV1 type). In write
    order: :func:`moe_router_tensors`, :func:`moe_expert_tensors` of each expert,
    :func:`moe_shared_tensors` (a streaming converter adds the same pieces in the same order).
    """
    out = moe_router_tensors(model_config, layer, q.router_weight, q.correction_bias)
    for expert in range(q.num_experts):
        out.update(moe_expert_tensors(fmt, model_config, layer, expert,
                                      {p: q.packed[p][expert] for p in EXPERT_PROJECTIONS},
                                      {p: q.scale[p][expert] for p in EXPERT_PROJECTIONS},
                                      q.alpha[expert] if with_alpha else None))
    out.update(moe_shared_tensors(fmt, model_config, layer, q.shared, q.shared_expert_gate))
    return out


def moe_router_tensors(model_config: MoEModelConfig, layer: int, router_weight: torch.Tensor,
                       correction_bias: torch.Tensor | None) -> dict[str, tuple[torch.Tensor, str]]:
    """The router weight (bf16) and, for ``noaux_tc`` routing, its correction bias (fp32)."""
    names = model_config.names
    prefix = names.layer_prefix(layer)
    out = {f"{prefix}.{names.router}.weight": (router_weight.to(torch.bfloat16), FLOAT)}
    if correction_bias is not None:
        out[f"{prefix}.{names.router}.e_score_correction_bias"] = (correction_bias.to(torch.float32), FLOAT)
    return out


def moe_expert_tensors(fmt: str | CheckpointFormat, model_config: MoEModelConfig, layer: int, expert: int,
                       packed: dict[str, torch.Tensor], scale: dict[str, torch.Tensor],
                       alpha: torch.Tensor | None) -> dict[str, tuple[torch.Tensor, str]]:
    """One routed expert's tensors from its packed int8 ``[N/2, K]`` and fp32 ``[N]`` scales per
    projection; ``alpha`` (0-d) is written only when given."""
    fmt = get_format(fmt)
    out: dict[str, tuple[torch.Tensor, str]] = {}
    for proj in EXPERT_PROJECTIONS:
        base = model_config.names.expert_weight(layer, expert, proj)
        for suffix, t in fmt.expert_tensors(proj, packed[proj], scale[proj], alpha).items():
            out[f"{base}.{suffix}"] = (t, W4A8_DYNAMIC)
    return out


def moe_shared_tensors(fmt: str | CheckpointFormat, model_config: MoEModelConfig, layer: int,
                       shared: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None,
                       shared_expert_gate: torch.Tensor | None) -> dict[str, tuple[torch.Tensor, str]]:
    """The shared expert (W8A8, or bf16 where its scale is ``None``) and its gate, if any."""
    fmt = get_format(fmt)
    out: dict[str, tuple[torch.Tensor, str]] = {}
    if shared is None:
        return out
    names = model_config.names
    for proj in EXPERT_PROJECTIONS:
        base = names.shared_weight(layer, proj)
        weight, scale = shared[proj]
        if scale is None:
            out[f"{base}.weight"] = (weight.to(torch.bfloat16), FLOAT)
        else:
            for suffix, t in fmt.linear_tensors(weight, scale).items():
                out[f"{base}.{suffix}"] = (t, W8A8_DYNAMIC)
    if shared_expert_gate is not None:
        out[f"{names.layer_prefix(layer)}.{names.shared_gate}.weight"] = (shared_expert_gate.to(torch.bfloat16), FLOAT)
    return out


class CheckpointWriter:
    """Streams a W4A8 checkpoint to disk tensor by tensor (the engine behind :func:`write_checkpoint`).

    Tensors go to atomically written shards as they come (``max_shard_bytes`` bounds what is
    held); :meth:`finish` writes the index, ``config.json`` (with ``quantization_config`` for
    compressed-tensors) or the AscendV1 description, and copies the non-weight files. What
    the format's metadata needs of every tensor (the AscendV1 type; the compressed-tensors
    ``ignore`` entry) is recorded by the format as the tensor is added, so a converter can
    persist it (``types``, ``ignore``) and :meth:`restore` it when it resumes after the
    shards already written. ``on_flush(file, names)`` is called
    after each shard is in place.
    """

    def __init__(self, path: str | Path, config: dict, fmt: str | CheckpointFormat = "compressed-tensors",
                 activation_use_clip: bool | None = None, max_shard_bytes: int = 4 << 30,
                 on_flush: Callable[[str, list[str]], None] | None = None, quant_method: str | None = None):
        self.fmt = get_format(fmt)
        self.options = self.fmt.write_options(activation_use_clip, quant_method)
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.model_config = MoEModelConfig.from_dict(config)
        self.activation_use_clip = self.options.activation_use_clip
        prefix, index = self.fmt.weights_prefix, self.fmt.index_file
        self.shards = ShardedSafetensorsWriter(self.path, prefix, index, max_shard_bytes, on_flush=on_flush)
        self.types: dict[str, str] = {}
        self.ignore: list[str] = []
        self._restored: set[str] = set()

    def restore(self, weight_map: dict[str, str], total_bytes: int, types: dict[str, str], ignore: list[str]) -> None:
        """Continue after shards a previous run finished (their tensors, types and ignore entries).

        Tensors already in those shards are skipped when added again, so a resumed converter
        can regenerate a partly written unit of work as a whole.
        """
        self.shards.restore(weight_map, total_bytes)
        self.types = dict(types)
        self.ignore = list(ignore)
        self._restored = set(weight_map)

    def add(self, name: str, tensor: torch.Tensor, kind: str) -> None:
        """Queue one tensor with its AscendV1 type (``FLOAT``, ``W8A8_DYNAMIC``, ``W4A8_DYNAMIC``)."""
        if name in self._restored:
            return  # already in a shard a previous (resumed) run finished
        self.shards.add(name, tensor)
        self.fmt.record_tensor(name, tensor, kind, self.types, self.ignore)

    def add_moe_layer(self, layer_idx: int, layer: FloatMoELayer | QuantizedMoELayer,
                      shared_format: str = "w8a8") -> None:
        """Queue every tensor of one MoE block (a float layer is quantized here)."""
        q = layer if isinstance(layer, QuantizedMoELayer) else quantize_moe_layer(layer, shared_format)
        self.add_all(moe_layer_tensors(self.fmt, self.model_config, layer_idx, q, self.activation_use_clip))

    def add_all(self, tensors: dict[str, tuple[torch.Tensor, str]]) -> None:
        """Queue ``name -> (tensor, AscendV1 type)`` in order (as :func:`moe_layer_tensors` gives them)."""
        for name, (tensor, kind) in tensors.items():
            self.add(name, tensor, kind)

    def add_w8a8_linear(self, name: str, weight: torch.Tensor) -> None:
        """Quantize a Linear's float ``weight`` (``name`` ends in ``.weight``) to W8A8 dynamic and queue it."""
        wq, s = quantize_int8_per_channel(weight)
        base = name[: -len(".weight")]
        for suffix, t in self.fmt.linear_tensors(wq, s).items():
            self.add(f"{base}.{suffix}", t, W8A8_DYNAMIC)

    def add_float(self, name: str, tensor: torch.Tensor) -> None:
        """Queue a tensor kept as it is (embeddings, norms, projections kept in bf16, ...)."""
        self.add(name, tensor, FLOAT)

    def flush(self) -> str | None:
        """Write what is queued as a shard now; return its file name."""
        return self.shards.flush()

    def finish(self, copy_files: list[Path] | None = None, description_metadata: dict | None = None) -> Path:
        """Flush, write the index and the config (or description), copy ``copy_files``; return the path."""
        self.shards.close()
        out_config = self.fmt.write_metadata(self.path, self.config, self.types, self.ignore, self.options,
                                             description_metadata)
        atomic_write_json(self.path / "config.json", out_config)
        for src in copy_files or []:
            atomic_copy_file(src, self.path / Path(src).name)
        return self.path


def write_checkpoint(
    path: str | Path,
    config: dict,
    moe_layers: dict[int, FloatMoELayer | QuantizedMoELayer],
    fmt: str | CheckpointFormat = "compressed-tensors",
    other_tensors: dict[str, torch.Tensor] | None = None,
    w8a8_linears: dict[str, torch.Tensor] | None = None,
    shared_format: str = "w8a8",
    activation_use_clip: bool | None = None,
    max_shard_bytes: int = 4 << 30,
    copy_files: list[Path] | None = None,
    quant_method: str | None = None,
) -> Path:
    """Write a W4A8 checkpoint of format ``fmt`` (``"compressed-tensors"`` or ``"ascendv1"``, or a format object).

    ``moe_layers`` maps layer index to a float layer (quantized here, with its weight and
    activation clips) or to an already quantized one. ``other_tensors`` are written as they
    are (embeddings, norms, attention kept in bf16, ...); ``w8a8_linears`` maps a Linear's
    ``weight`` name to its float weight, quantized to W8A8 dynamic. ``activation_use_clip``
    defaults to True for compressed-tensors (alphas written) and is always False for
    AscendV1, which has no clip. ``quant_method``: the compressed-tensors spelling,
    ``"compressed-tensors"`` (default) or ``"modelslim"`` (what sglang 0.5.7's NPU path
    loads); AscendV1 has none. Shards and metadata files are written atomically; the
    index is written last. Returns ``path``.
    """
    writer = CheckpointWriter(path, config, fmt, activation_use_clip, max_shard_bytes, quant_method=quant_method)
    for layer_idx in sorted(moe_layers):
        writer.add_moe_layer(layer_idx, moe_layers[layer_idx], shared_format)
    for name, weight in sorted((w8a8_linears or {}).items()):
        writer.add_w8a8_linear(name, weight)
    for name, tensor in sorted((other_tensors or {}).items()):
        writer.add_float(name, tensor)
    return writer.finish(copy_files)
