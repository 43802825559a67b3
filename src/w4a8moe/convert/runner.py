"""Run the source model one decoder layer at a time on calibration tokens.

The decoder layer classes are transformers' own (built from ``config.json``, random init on
the meta device, then filled with this layer's tensors from the source shards), so every
family's attention, norms and MoE block behave exactly as upstream. Only one layer's weights
are in memory at a time; the hidden states of all calibration tokens (``[S, T, H]`` in the
model dtype) are carried in memory from layer to layer.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch
from torch import nn

from w4a8moe.errors import ConversionError
from w4a8moe.convert.source import SourceCheckpoint

_FAMILIES = {
    "deepseek_v3": ("deepseek_v3", "DeepseekV3"),
    "deepseek_v2": ("deepseek_v2", "DeepseekV2"),
    "qwen2_moe": ("qwen2_moe", "Qwen2Moe"),
    "qwen3_moe": ("qwen3_moe", "Qwen3Moe"),
    "mixtral": ("mixtral", "Mixtral"),
    "olmoe": ("olmoe", "Olmoe"),
}
_FP32_KEYS = ("e_score_correction_bias",)
# Memory: oneDNN (via ideep) caches the bf16 matmul primitives of every distinct shape, about
# 0.7 MB per shape, up to 1024 shapes (two caches: ideep's ``LRU_CACHE_CAPACITY`` and oneDNN's
# ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``). The eager expert loop of a transformers MoE layer runs
# matmuls with a new row count (the tokens routed to the expert) almost every call, so with the
# default capacities the caches grew native heap by ~30 MB per decoder layer, to ~0.7 GB and
# beyond, while almost never hitting. Both are read when oneDNN first builds a primitive, so the
# bound only applies if nothing in this process ran a oneDNN matmul before; a value the user
# set in the environment wins.
_ONEDNN_CACHE_CAPACITY = "16"


@dataclass
class LayerActivations:
    """What one decoder layer saw and produced on the calibration tokens.

    ``moe_input``/``moe_output``: the MoE block's input and float output ``[S*T, H]`` (model
    dtype), ``None`` for a dense layer.
    """

    moe_input: torch.Tensor | None
    moe_output: torch.Tensor | None


def _hf_config(config: dict):
    from transformers import AutoConfig

    clean = {k: v for k, v in config.items() if k not in ("quantization_config", "w4a8moe")}
    model_type = clean.pop("model_type")
    try:
        hf = AutoConfig.for_model(model_type, **clean)
    except (ValueError, KeyError) as exc:
        raise ConversionError(f"transformers cannot build a {model_type!r} config from config.json: {exc}") from exc
    # Eager attention with an explicit additive mask: deterministic and the same on every family.
    hf._attn_implementation = "eager"
    # The plain per-expert loop: transformers' reference expert math, no fused kernels.
    hf._experts_implementation = "eager"
    return hf


def causal_mask(seq_len: int, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """Additive mask ``[1, 1, T, T]``: 0 where query ``i`` may see key ``j <= i`` (within ``window``)."""
    i = torch.arange(seq_len).unsqueeze(1)
    j = torch.arange(seq_len).unsqueeze(0)
    allowed = j <= i
    if window is not None:
        allowed &= (i - j) < window
    mask = torch.zeros(seq_len, seq_len, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


class LayerRunner:
    """Builds one transformers decoder layer at a time from the source and runs it."""

    def __init__(self, source: SourceCheckpoint, dtype: torch.dtype, batch_size: int = 8,
                 device: torch.device | str = "cpu"):
        for var in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
            os.environ.setdefault(var, _ONEDNN_CACHE_CAPACITY)
        self.source = source
        self.dtype = dtype
        self.batch_size = batch_size
        # Where the layer runs; hidden states and captured MoE I/O stay on the CPU.
        self.device = torch.device(device)
        mc = source.model_config
        if mc.model_type not in _FAMILIES:
            raise ConversionError(f"no transformers decoder layer known for model_type {mc.model_type!r}")
        module_name, prefix = _FAMILIES[mc.model_type]
        try:
            modeling = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
            self.layer_cls = getattr(modeling, f"{prefix}DecoderLayer")
            rotary_cls = getattr(modeling, f"{prefix}RotaryEmbedding")
        except (ImportError, AttributeError) as exc:
            raise ConversionError(f"this transformers version lacks the {prefix} decoder layer: {exc}") from exc
        self.hf_config = _hf_config(source.config)
        self.rotary = rotary_cls(self.hf_config)
        window = getattr(self.hf_config, "sliding_window", None)
        self.window = window if (window and getattr(self.hf_config, "use_sliding_window", True)) else None

    # --------------------------------------------------------------- embedding
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[S, T, H]`` of ``ids`` ``[S, T]`` in the model dtype."""
        weight = self.source.load_float("model.embed_tokens.weight", self.dtype)
        if int(ids.max()) >= weight.shape[0]:
            raise ConversionError(
                f"calibration token id {int(ids.max())} is outside the embedding table ({weight.shape[0]} rows)"
            )
        return nn.functional.embedding(ids, weight)

    # --------------------------------------------------------------- one layer
    def _source_name(self, layer: int, key: str) -> str:
        block = self.source.model_config.names.block
        if key.startswith("mlp.") and block != "mlp":
            key = f"{block}.{key[len('mlp.'):]}"
        return f"model.layers.{layer}.{key}"

    def build_layer(self, layer: int, routed_experts: bool = True) -> nn.Module:
        """The transformers decoder layer ``layer`` holding the source's weights (model dtype).

        ``routed_experts=False`` leaves a MoE block's fused routed-expert weights on the meta
        device (for :meth:`run_layer`, which runs them one expert at a time).
        """
        mc = self.source.model_config
        with torch.device("meta"):
            module = self.layer_cls(self.hf_config, layer)
        state: dict[str, torch.Tensor] = {}
        left_out = []
        for key, meta in module.state_dict().items():
            dtype = torch.float32 if any(k in key for k in _FP32_KEYS) else self.dtype
            if key.endswith("experts.gate_up_proj") or key.endswith("experts.down_proj"):
                if routed_experts:
                    state[key] = self._fused_experts(layer, key, tuple(meta.shape), dtype)
                else:
                    left_out.append(key)
                continue
            name = self._source_name(layer, key)
            tensor = self.source.load_float(name, dtype)
            if tuple(tensor.shape) != tuple(meta.shape):
                raise ConversionError(
                    f"source tensor {name!r} has shape {list(tensor.shape)}; the {mc.model_type} layer expects "
                    f"{list(meta.shape)}"
                )
            state[key] = tensor
        result = module.load_state_dict(state, strict=False, assign=True)
        if sorted(result.missing_keys) != sorted(left_out) or result.unexpected_keys:
            raise ConversionError(f"layer {layer}: the {mc.model_type} decoder layer's weights do not match the "
                                  f"source (missing {result.missing_keys}, unexpected {result.unexpected_keys})")
        module.eval()
        return module

    def _expert_weights(self, layer: int, expert: int, dtype: torch.dtype,
                        shapes: tuple[tuple[int, ...], tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert's fused ``gate_up`` ``[2I, H]`` (gate then up) and ``down`` ``[H, I]``."""
        names = self.source.model_config.names
        out = []
        for projs, shape in zip((("gate", "up"), ("down",)), shapes):
            parts = [self.source.load_float(names.expert_weight(layer, expert, p) + ".weight", dtype) for p in projs]
            fused = torch.cat(parts) if len(parts) > 1 else parts[0]
            if tuple(fused.shape) != tuple(shape):
                raise ConversionError(
                    f"layer {layer} expert {expert} {'/'.join(projs)} weights have shape {list(fused.shape)}; "
                    f"the layer expects {list(shape)}"
                )
            out.append(fused)
        return out[0], out[1]

    def _fused_experts(self, layer: int, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """transformers keeps experts fused (``gate_up_proj`` = gate then up along N); the files don't."""
        names = self.source.model_config.names
        out = torch.empty(shape, dtype=dtype)
        projs = ("gate", "up") if key.endswith("gate_up_proj") else ("down",)
        for expert in range(shape[0]):
            parts = [self.source.load_float(names.expert_weight(layer, expert, p) + ".weight", dtype) for p in projs]
            fused = torch.cat(parts) if len(parts) > 1 else parts[0]
            if tuple(fused.shape) != shape[1:]:
                raise ConversionError(
                    f"layer {layer} expert {expert} {'/'.join(projs)} weights have shape {list(fused.shape)}; "
                    f"the layer expects {list(shape[1:])}"
                )
            out[expert] = fused
        return out

    @torch.no_grad()
    def run(self, module: nn.Module, hidden: torch.Tensor, capture_moe: bool) -> tuple[torch.Tensor, LayerActivations]:
        """Run ``module`` on ``hidden`` ``[S, T, H]``; return its output and the MoE block's I/O."""
        seqs, seq_len, _ = hidden.shape
        dev = self.device
        module.to(dev)
        self.rotary.to(dev)
        mask = causal_mask(seq_len, self.dtype, self.window).to(dev)
        position_ids = torch.arange(seq_len, device=dev).unsqueeze(0)
        moe_in: list[torch.Tensor] = []
        moe_out: list[torch.Tensor] = []
        handle = None
        if capture_moe:
            def hook(_mod, inputs, output):
                moe_in.append(inputs[0].reshape(-1, inputs[0].shape[-1]).to("cpu", copy=True))
                out = output[0] if isinstance(output, tuple) else output
                moe_out.append(out.reshape(-1, out.shape[-1]).to("cpu", copy=True))

            handle = module.mlp.register_forward_hook(hook)
        outputs = []
        try:
            for start in range(0, seqs, self.batch_size):
                chunk = hidden[start : start + self.batch_size].to(dev)
                cos_sin = self.rotary(chunk, position_ids)
                out = module(chunk, attention_mask=mask, position_ids=position_ids.expand(chunk.shape[0], -1),
                             position_embeddings=cos_sin)
                outputs.append((out[0] if isinstance(out, tuple) else out).to("cpu"))
        finally:
            if handle is not None:
                handle.remove()
        acts = LayerActivations(torch.cat(moe_in) if moe_in else None, torch.cat(moe_out) if moe_out else None)
        return torch.cat(outputs), acts


    # ------------------------------------------------- one layer, expert by expert
    @torch.no_grad()
    def run_layer(self, layer: int, hidden: torch.Tensor, capture_moe: bool
                  ) -> tuple[torch.Tensor, LayerActivations]:
        """Build and run decoder layer ``layer`` on ``hidden`` ``[S, T, H]``: :meth:`run`'s result.

        A MoE layer's routed experts are never all in memory: the layer runs with its MoE
        block stubbed out (:class:`_MoEBlockStub`), the block then runs with its experts
        recorded rather than computed (router and shared expert as upstream), and last each
        expert, loaded alone, runs transformers' own expert code on the rows routed to it
        (:meth:`_add_expert`). The sums are formed in the order upstream forms them, so the
        outputs have the same bits as :meth:`run` of the whole layer.
        """
        module = self.build_layer(layer, routed_experts=False)
        experts = getattr(getattr(module, "mlp", None), "experts", None)
        if experts is None or not hasattr(experts, "gate_up_proj"):
            return self.run(module, hidden, capture_moe)
        seqs, seq_len, _ = hidden.shape
        mask = causal_mask(seq_len, self.dtype, self.window)
        position_ids = torch.arange(seq_len).unsqueeze(0)
        block = module.mlp
        stub = _MoEBlockStub()
        module.mlp = stub
        residuals = []
        for start in range(0, seqs, self.batch_size):
            chunk = hidden[start : start + self.batch_size]
            out = module(chunk, attention_mask=mask, position_ids=position_ids.expand(chunk.shape[0], -1),
                         position_embeddings=self.rotary(chunk, position_ids))
            residuals.append(out[0] if isinstance(out, tuple) else out)  # residual + (-0) = the residual
        module.mlp = block
        recorder = _ExpertsRecorder()
        block.experts = recorder
        rest = [block(x) for x in stub.inputs]  # the block without its routed experts: shared expert or -0
        if any(not isinstance(r, torch.Tensor) for r in rest):
            raise ConversionError(f"layer {layer}: the {self.source.model_config.model_type} MoE block returns "
                                  "a tuple; expert-by-expert calibration expects a tensor")
        sums = [torch.zeros_like(h) for h, _, _ in recorder.calls]
        experts.num_experts = 1  # runs as a one-expert module; the other experts map to its "none" slot
        shapes = (tuple(experts.gate_up_proj.shape[1:]), tuple(experts.down_proj.shape[1:]))
        for expert in range(self.source.model_config.num_experts):
            hit = [bool((ids == expert).any()) for _, ids, _ in recorder.calls]
            if any(hit):
                gate_up, down = self._expert_weights(layer, expert, self.dtype, shapes)
                experts.gate_up_proj = nn.Parameter(gate_up[None], requires_grad=False)
                experts.down_proj = nn.Parameter(down[None], requires_grad=False)
                for total, (x, ids, weights), used in zip(sums, recorder.calls, hit):
                    if used:
                        # upstream index_adds each expert onto zeros in increasing expert order; a
                        # token's sum starts at +0, never becomes -0, so adding +0 elsewhere is exact.
                        total.add_(experts(x, torch.where(ids == expert, 0, 1), weights))
                del gate_up, down
                experts.gate_up_proj = experts.down_proj = None
            self.source.release()
        outputs, moe_in, moe_out = [], [], []
        for residual, x, total, partial in zip(residuals, stub.inputs, sums, rest):
            moe = total.view(partial.shape) + partial
            outputs.append(residual + moe)
            if capture_moe:
                moe_in.append(x.reshape(-1, x.shape[-1]))
                moe_out.append(moe.reshape(-1, moe.shape[-1]))
        acts = LayerActivations(torch.cat(moe_in) if moe_in else None, torch.cat(moe_out) if moe_out else None)
        return torch.cat(outputs), acts


class _MoEBlockStub(nn.Module):
    """Stands in for a MoE block: records its input, returns ``-0`` (``r + (-0) == r`` for every ``r``)."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.inputs.append(hidden_states)
        return torch.full_like(hidden_states, -0.0)


class _ExpertsRecorder(nn.Module):
    """Stands in for a block's routed experts: records the routing, returns ``-0`` (as above)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        self.calls.append((hidden_states, top_k_index, top_k_weights))
        return torch.full_like(hidden_states, -0.0)
