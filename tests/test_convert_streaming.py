"""Conversion memory: MoE layers calibrated and written expert by expert, with the same results.

The streamed paths (calibration forward one expert at a time, experts queued to the writer as
they are quantized, layer errors accumulated per expert) are checked against slow paths that
hold the whole layer: transformers' own decoder layer with all experts, and the quantization
primitives applied to the stacked ``[E, N, K]`` weights of a layer.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from w4a8moe import open_checkpoint
from w4a8moe.convert import SourceCheckpoint, convert
from w4a8moe.convert.moe_error import StreamedMoEOutput
from w4a8moe.convert.runner import LayerRunner
from w4a8moe.convert.synthetic import make_fp8_checkpoint, make_hf_checkpoint
from w4a8moe.formats.layer_tensors import FloatMoELayer, quantize_moe_layer
from w4a8moe.formats.model_config import EXPERT_PROJECTIONS
from w4a8moe.models import tiny_config
from w4a8moe.moe import W4A8MoE
from w4a8moe.quant import (
    encode_scale_uint64,
    kernel_bias,
    kernel_bias_chunks,
    pack_int4_pairs,
    quantize_int4_per_channel,
)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (so that -0 and +0 differ, and NaNs compare)."""
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("model_type,dtype", [("deepseek_v3", torch.bfloat16), ("deepseek_v3", torch.float32),
                                              ("qwen2_moe", torch.bfloat16), ("qwen3_moe", torch.bfloat16),
                                              ("mixtral", torch.bfloat16), ("olmoe", torch.bfloat16)])
def test_expert_by_expert_layer_run_equals_the_whole_transformers_layer(tmp_path, model_type, dtype):
    src = make_hf_checkpoint(tiny_config(model_type), tmp_path / "src", seed=3, outliers=True, dtype=dtype)
    source = SourceCheckpoint(src)
    runner = LayerRunner(source, source.compute_dtype(), batch_size=2)  # 5 sequences: chunks of 2, 2, 1
    ids = torch.randint(0, source.model_config.vocab_size if hasattr(source.model_config, "vocab_size") else 256,
                        (5, 12), generator=torch.Generator().manual_seed(0))
    hidden = runner.embed(ids)
    moe_layers = 0
    for layer in range(source.model_config.num_hidden_layers):
        whole_out, whole_acts = runner.run(runner.build_layer(layer), hidden, capture_moe=True)
        out, acts = runner.run_layer(layer, hidden, capture_moe=True)
        assert torch.equal(_bits(out), _bits(whole_out)), f"layer {layer}: next hidden states differ"
        if whole_acts.moe_input is None:
            assert acts.moe_input is None
            continue
        moe_layers += 1
        assert torch.equal(_bits(acts.moe_input), _bits(whole_acts.moe_input))
        assert torch.equal(_bits(acts.moe_output), _bits(whole_acts.moe_output))
        hidden = whole_out
    assert moe_layers >= 2


def test_streamed_moe_output_equals_the_reference_layer():
    torch.manual_seed(0)
    mc_cfg = tiny_config("deepseek_v3", n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2)
    from w4a8moe.formats.model_config import MoEModelConfig
    from w4a8moe.quant import quantize_int8_per_channel

    mc = MoEModelConfig.from_dict(mc_cfg)
    e, h, i = 8, mc.hidden_size, mc.moe_intermediate_size
    router = (0.3 * torch.randn(e, h)).to(torch.bfloat16)
    experts = {"gate": torch.randn(e, i, h), "up": torch.randn(e, i, h), "down": torch.randn(e, h, i)}
    experts["down"][2, :, 3] *= 40.0  # an outlier column
    shared = {"gate": quantize_int8_per_channel(torch.randn(2 * i, h)), "up": quantize_int8_per_channel(torch.randn(2 * i, h)),
              "down": quantize_int8_per_channel(torch.randn(h, 2 * i))}
    correction = 0.05 * torch.randn(e)
    correction[5] = -100.0  # expert 5 gets no token: the streamed sum must skip it
    alpha = torch.rand(e) * 0.5 + 0.5
    q = quantize_moe_layer(FloatMoELayer(router, experts, correction, alpha=alpha))
    q.shared = shared
    x = torch.randn(37, h).to(torch.bfloat16)
    x[3] = 0.0
    x[7, 11] = 500.0
    expected = W4A8MoE.from_quantized(q, mc.routing, backend="reference")(x)
    stream = StreamedMoEOutput(x, router, mc.routing, correction)
    assert stream.rows_of(5)[0].numel() == 0
    for expert in range(e):
        stream.add_expert(expert, {p: q.packed[p][expert] for p in EXPERT_PROJECTIONS},
                          {p: q.scale[p][expert] for p in EXPERT_PROJECTIONS}, alpha[expert])
    got = stream.finish(shared, None)
    assert torch.equal(_bits(got), _bits(expected))
    with pytest.raises(ValueError, match="increasing order"):
        stream.add_expert(3, {}, {}, 1.0)


_SUFFIX_ORDER = ("weight", "weight_scale", "weight_offset", "scale_bias", "bias", "alpha")


def _slow_expert_tensors(source: SourceCheckpoint, layer: int, fmt: str) -> dict[str, torch.Tensor]:
    """Every routed-expert tensor of ``layer`` from the whole stacked layer (the landed algorithm:
    quantize ``[E, N, K]`` at once, kernel bias of the whole unpacked tensor)."""
    mc = source.model_config
    names = mc.names
    out = {}
    for proj in EXPERT_PROJECTIONS:
        w = torch.stack([source.load_float(names.expert_weight(layer, e, proj) + ".weight")
                         for e in range(mc.num_experts)])
        q, s = quantize_int4_per_channel(w)
        packed = pack_int4_pairs(q)
        n = q.shape[1]
        if fmt == "ascendv1":
            bias = kernel_bias_chunks(q, s) if proj == "down" else kernel_bias(q, s).reshape(-1, n, 1)
        else:
            bias = kernel_bias(q, s)
        for e in range(mc.num_experts):
            base = names.expert_weight(layer, e, proj)
            out[f"{base}.weight"] = packed[e]
            if fmt == "ascendv1":
                out[f"{base}.weight_scale"] = s[e].reshape(n, 1)
                out[f"{base}.weight_offset"] = torch.zeros(n, 1)
                out[f"{base}.scale_bias"] = bias[e]
            else:
                out[f"{base}.weight_scale"] = encode_scale_uint64(s[e].reshape(n, 1).contiguous())
                out[f"{base}.bias"] = bias[e]
                if proj == "down":
                    out[f"{base}.alpha"] = torch.ones(())
    return out


def _expected_order(source: SourceCheckpoint, weight_map: dict[str, str]) -> list[str]:
    """Output names in the order the converter adds them: units in order; in a MoE block the
    router, its correction bias, expert by expert (gate, up, down), the shared expert; then the
    unit's other tensors by source name (each with its W8A8 companions)."""
    mc = source.model_config
    names = mc.names
    groups = source.layer_names()
    order: list[str] = []

    def with_suffixes(base: str) -> list[str]:
        return [f"{base}.{s}" for s in _SUFFIX_ORDER if f"{base}.{s}" in weight_map]

    for layer in [None] + sorted(k for k in groups if k is not None):
        block: list[str] = []
        if layer in mc.expected_moe_layers:
            prefix = names.layer_prefix(layer)
            block += [n for n in (f"{prefix}.{names.router}.weight", f"{prefix}.{names.router}.e_score_correction_bias")
                      if n in weight_map]
            for e in range(mc.num_experts):
                for p in EXPERT_PROJECTIONS:
                    block += with_suffixes(names.expert_weight(layer, e, p))
            for p in EXPERT_PROJECTIONS:
                block += with_suffixes(names.shared_weight(layer, p))
        order += block
        for name in groups[layer]:
            if name in block:
                continue
            base = name[: -len(".weight")] if name.endswith(".weight") else None
            if name in weight_map and (base is None or f"{base}.weight_scale" not in weight_map):
                order.append(name)
            elif base is not None and f"{base}.weight_scale" in weight_map and base + ".weight" not in block:
                order += with_suffixes(base)
    return order


@pytest.mark.parametrize("src_kind,fmt", [("bf16", "compressed-tensors"), ("bf16", "ascendv1"),
                                          ("fp8", "compressed-tensors")])
def test_rtn_output_bytes_equal_the_whole_layer_algorithm(tmp_path, src_kind, fmt):
    cfg = tiny_config("deepseek_v3", n_routed_experts=6, n_group=2, topk_group=1, num_experts_per_tok=2, hidden_size=128, moe_intermediate_size=64)
    src = make_hf_checkpoint(cfg, tmp_path / "src", seed=1, max_shard_size="200KB", outliers=True)
    if src_kind == "fp8":
        src = make_fp8_checkpoint(src, tmp_path / "fp8")
    max_shard = 150_000  # shards end inside MoE layers
    dst = tmp_path / "out"
    convert(src, dst, fmt=fmt, learn=False, progress=False, max_shard_bytes=max_shard)
    source = SourceCheckpoint(src)
    index = next(dst.glob("*.safetensors.index.json"))
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]

    # 1. Every expert tensor has the bits of the whole-layer slow path.
    slow = {}
    for layer in source.model_config.expected_moe_layers:
        slow.update(_slow_expert_tensors(source, layer, fmt))
    assert slow and set(slow) <= set(weight_map)
    shard_files = sorted(set(weight_map.values()))
    assert len(shard_files) >= 4
    for fname in shard_files:
        tensors = {}
        with safe_open(str(dst / fname), framework="pt") as fh:
            metadata = fh.metadata()
            for name in fh.keys():
                t = fh.get_tensor(name)
                if name in slow:
                    assert t.dtype == slow[name].dtype and torch.equal(t, slow[name]), name
                    t = slow[name]
                tensors[name] = t.contiguous()
        # 2. The file holds exactly those tensors, serialised as safetensors does: same bytes.
        save_file(tensors, str(tmp_path / "rebuilt.safetensors"), metadata=metadata)
        assert (tmp_path / "rebuilt.safetensors").read_bytes() == (dst / fname).read_bytes(), fname

    # 3. Tensors fall into shards as the add order and the size bound say.
    order = _expected_order(source, weight_map)
    assert sorted(order) == sorted(weight_map)
    sizes = {}
    for fname in shard_files:
        with safe_open(str(dst / fname), framework="pt") as fh:
            for name in fh.keys():
                sl = fh.get_slice(name)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                sizes[name] = numel * {"I8": 1, "BF16": 2, "F32": 4, "U64": 8}[sl.get_dtype()]
    expected_map, shard, pending = {}, 1, 0
    for name in order:
        if pending and pending + sizes[name] > max_shard:
            shard, pending = shard + 1, 0
        expected_map[name] = shard
        pending += sizes[name]
    got = {name: shard_files.index(f) + 1 for name, f in weight_map.items()}
    assert got == expected_map


def test_verify_releases_the_shards_it_checked(tmp_path, monkeypatch):
    from w4a8moe.formats import checkpoint as checkpoint_module
    from w4a8moe.formats.safetensors_io import ShardedSafetensorsReader

    src = make_hf_checkpoint(tiny_config("deepseek_v3"), tmp_path / "src", seed=0)
    dst = tmp_path / "out"
    convert(src, dst, learn=False, progress=False, max_shard_bytes=50_000)
    # Mapped bytes between two releases: at most one expert inside MoE blocks, about the
    # release threshold outside them.
    monkeypatch.setattr(checkpoint_module, "_RELEASE_BYTES", 20_000)
    held = {"now": 0, "max": 0}
    get, close = ShardedSafetensorsReader.get, ShardedSafetensorsReader.close

    def spy_get(self, name):
        t = get(self, name)
        held["now"] += t.numel() * t.element_size()
        held["max"] = max(held["max"], held["now"])
        return t

    def spy_close(self):
        held["now"] = 0
        close(self)

    monkeypatch.setattr(ShardedSafetensorsReader, "get", spy_get)
    monkeypatch.setattr(ShardedSafetensorsReader, "close", spy_close)
    ckpt = open_checkpoint(dst)
    assert len(set(i.file for i in ckpt.reader.infos.values())) > 2
    mc = ckpt.model_config
    expert_bytes = sum(ckpt.reader.infos[n].dtype.itemsize * torch.Size(ckpt.reader.infos[n].shape).numel()
                       for n in ckpt.reader.infos if ".experts.0." in n and n.startswith("model.layers.1."))
    largest = max(ckpt.reader.infos[n].dtype.itemsize * torch.Size(ckpt.reader.infos[n].shape).numel()
                  for n in ckpt.reader.infos)
    assert held["max"] <= max(expert_bytes, 20_000 + largest), (held, expert_bytes)
    assert held["max"] < ckpt.reader.nbytes() / 4
    # The loaded layer API still holds the whole layer.
    assert ckpt.load_moe_layer_tensors(1).packed["gate"].shape[0] == mc.num_experts
