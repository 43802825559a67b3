"""Both checkpoint formats: round trips, and every kind of defect refused with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from w4a8moe import CheckpointError, open_checkpoint, write_checkpoint
from w4a8moe.formats import ASCENDV1, COMPRESSED_TENSORS, MoEModelConfig, quantize_moe_layer
from w4a8moe.formats.safetensors_io import read_safetensors_header
from w4a8moe.models.synthetic import random_float_moe_layer, tiny_config
from w4a8moe.quant import dequantize_per_channel, unpack_int4_pairs

FORMATS = [COMPRESSED_TENSORS.name, ASCENDV1.name]
FAMILIES = ["deepseek_v3", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe"]
EXPERT = "model.layers.1.mlp.experts.3"


def _write(tmp_path: Path, fmt: str, model_type: str = "deepseek_v3", shard_bytes: int = 16 * 1024, **kw) -> Path:
    cfg = tiny_config(model_type)
    mc = MoEModelConfig.from_dict(cfg)
    alpha = torch.linspace(0.5, 1.0, mc.num_experts)
    layers = {1: random_float_moe_layer(cfg, seed=1, alpha=alpha), 2: random_float_moe_layer(cfg, seed=2)}
    others = {"model.embed_tokens.weight": torch.randn(cfg["vocab_size"], cfg["hidden_size"]).to(torch.bfloat16),
              "model.norm.weight": torch.ones(cfg["hidden_size"], dtype=torch.bfloat16)}
    w8 = {"model.layers.0.mlp.down_proj.weight": torch.randn(cfg["hidden_size"], 128)}
    return write_checkpoint(tmp_path / str(fmt), cfg, layers, fmt, other_tensors=others, w8a8_linears=w8,
                            max_shard_bytes=shard_bytes, **kw)


def _edit_tensor(path: Path, name: str, fn) -> None:
    """Apply ``fn`` to one stored tensor (``fn`` returns the new tensor, or None to delete it)."""
    ckpt = open_checkpoint(path, validate="structure")
    shard = ckpt.reader.infos[name].file
    tensors = load_file(shard)
    new = fn(tensors[name].clone())
    if new is None:
        del tensors[name]
    else:
        tensors[name] = new
    save_file(tensors, shard, metadata={"format": "pt"})


def _index(path: Path) -> Path:
    return next(p for p in path.iterdir() if p.name.endswith(".index.json"))


def _drop_from_metadata(path: Path, name: str) -> None:
    """Remove a tensor from the index (and the AscendV1 description) too."""
    idx = _index(path)
    data = json.loads(idx.read_text())
    data["weight_map"].pop(name)
    idx.write_text(json.dumps(data))
    desc = path / "quant_model_description.json"
    if desc.exists():
        d = json.loads(desc.read_text())
        d.pop(name, None)
        desc.write_text(json.dumps(d))


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_roundtrip_open_verify_forward(tmp_path, fmt, model_type):
    path = _write(tmp_path, fmt, model_type)
    ckpt = open_checkpoint(path)
    assert ckpt.format == fmt
    assert ckpt.activation_use_clip == (fmt == COMPRESSED_TENSORS)
    assert ckpt.moe_layers == [1, 2]
    assert ckpt.config["model_type"] == model_type
    layer = ckpt.moe_layer(1)
    x = torch.randn(9, ckpt.model_config.hidden_size).to(torch.bfloat16)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == torch.bfloat16 and bool(torch.isfinite(y.float()).all())
    assert len(list(path.glob("*.safetensors"))) > 1  # really sharded


@pytest.mark.parametrize("fmt", FORMATS)
def test_roundtrip_values_match_quantizer(tmp_path, fmt):
    cfg = tiny_config("deepseek_v3")
    alpha = torch.linspace(0.5, 1.0, 8)
    float_layer = random_float_moe_layer(cfg, seed=1, alpha=alpha)
    path = _write(tmp_path, fmt)
    loaded = open_checkpoint(path).load_moe_layer_tensors(1)
    direct = quantize_moe_layer(float_layer)
    for proj in ("gate", "up", "down"):
        assert torch.equal(loaded.packed[proj], direct.packed[proj])
        assert torch.equal(loaded.scale[proj], direct.scale[proj])
        deq = dequantize_per_channel(unpack_int4_pairs(loaded.packed[proj]), loaded.scale[proj])
        err = (deq - float_layer.experts[proj]).abs()
        assert bool((err <= loaded.scale[proj].unsqueeze(-1) / 2 * (1 + 1e-6)).all())  # int4 error bound
    expected_alpha = alpha if fmt == COMPRESSED_TENSORS else torch.ones(8)  # AscendV1 has no clip
    assert torch.equal(loaded.alpha, expected_alpha)


def test_compressed_tensors_layout_matches_sglang_names(tmp_path):
    path = _write(tmp_path, COMPRESSED_TENSORS)
    ckpt = open_checkpoint(path)
    infos = ckpt.reader.infos
    assert infos[f"{EXPERT}.gate_proj.weight"].dtype == torch.int8
    assert infos[f"{EXPERT}.gate_proj.weight"].shape == (16, 64)
    assert infos[f"{EXPERT}.gate_proj.weight_scale"].dtype == torch.uint64
    assert infos[f"{EXPERT}.gate_proj.weight_scale"].shape == (32, 1)
    assert infos[f"{EXPERT}.down_proj.bias"].shape == (64,)
    assert infos[f"{EXPERT}.down_proj.alpha"].dtype == torch.float32
    assert f"{EXPERT}.gate_proj.alpha" not in infos
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_1"]
    assert group["targets"] == ["MoEGMM"] and group["activation_use_clip"] is True
    assert group["weights"]["num_bits"] == 4


def test_ascendv1_layout(tmp_path):
    path = _write(tmp_path, ASCENDV1)
    desc = json.loads((path / "quant_model_description.json").read_text())
    assert desc[f"{EXPERT}.down_proj.weight"] == "W4A8_DYNAMIC"
    assert desc["model.layers.1.mlp.shared_experts.gate_proj.weight"] == "W8A8_DYNAMIC"
    assert desc["model.embed_tokens.weight"] == "FLOAT"
    assert desc["version"] == "1.0.0"
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    infos = open_checkpoint(path).reader.infos
    assert infos[f"{EXPERT}.down_proj.scale_bias"].shape == (64, 16)
    assert infos[f"{EXPERT}.up_proj.scale_bias"].shape == (32, 1)
    assert infos[f"{EXPERT}.up_proj.weight_scale"].dtype == torch.float32
    assert all(p.name.startswith("quant_model_weights") for p in path.glob("*.safetensors"))


def test_moegmm_group_under_any_name_and_modelslim_method(tmp_path):
    path = _write(tmp_path, COMPRESSED_TENSORS)
    cfg = json.loads((path / "config.json").read_text())
    groups = cfg["quantization_config"]["config_groups"]
    groups["moe"] = groups.pop("group_1")
    cfg["quantization_config"]["quant_method"] = "modelslim"
    (path / "config.json").write_text(json.dumps(cfg))
    ckpt = open_checkpoint(path)
    assert ckpt.moe_group == "moe" and ckpt.activation_use_clip


def test_clip_flag_false_means_no_alpha_tensors(tmp_path):
    path = _write(tmp_path, COMPRESSED_TENSORS, activation_use_clip=False)
    ckpt = open_checkpoint(path)
    assert not ckpt.activation_use_clip
    assert not any(n.endswith(".alpha") for n in ckpt.reader.infos)
    assert torch.equal(ckpt.load_moe_layer_tensors(1).alpha, torch.ones(8))


def test_apply_alpha_false_reproduces_upstream(tmp_path):
    path = _write(tmp_path, COMPRESSED_TENSORS)
    ckpt = open_checkpoint(path)
    x = torch.randn(20, 64).to(torch.bfloat16)
    with_clip, without = ckpt.moe_layer(1)(x), ckpt.moe_layer(1, apply_alpha=False)(x)
    assert not torch.equal(with_clip, without)


# ---------------------------------------------------------------- defects
def _expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    msg = str(info.value)
    for f in fragments:
        assert f in msg, msg
    return msg


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("suffix", ["weight", "weight_scale"])
def test_missing_tensor(tmp_path, fmt, suffix):
    path = _write(tmp_path, fmt)
    name = f"{EXPERT}.up_proj.{suffix}"
    _edit_tensor(path, name, lambda t: None)
    _drop_from_metadata(path, name)
    _expect_error(path, "missing tensor", name)


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_bias_never_defaults(tmp_path, fmt):
    path = _write(tmp_path, fmt)
    name = f"{EXPERT}.down_proj." + ("bias" if fmt == COMPRESSED_TENSORS else "scale_bias")
    _edit_tensor(path, name, lambda t: None)
    _drop_from_metadata(path, name)
    _expect_error(path, "missing tensor", name)


def test_missing_alpha_never_defaults(tmp_path):
    path = _write(tmp_path, COMPRESSED_TENSORS)
    name = f"{EXPERT}.down_proj.alpha"
    _edit_tensor(path, name, lambda t: None)
    _drop_from_metadata(path, name)
    _expect_error(path, "missing tensor", name)


@pytest.mark.parametrize("fmt", FORMATS)
def test_extra_tensor(tmp_path, fmt):
    path = _write(tmp_path, fmt)
    name = f"{EXPERT}.up_proj.weight"
    extra = f"{EXPERT}.up_proj.weight_scale_second"
    ckpt = open_checkpoint(path, validate="structure")
    shard = ckpt.reader.infos[name].file
    tensors = load_file(shard)
    tensors[extra] = torch.ones(32, 4)
    save_file(tensors, shard)
    idx = _index(path)
    data = json.loads(idx.read_text())
    data["weight_map"][extra] = shard.name
    idx.write_text(json.dumps(data))
    if fmt == ASCENDV1:
        desc = json.loads((path / "quant_model_description.json").read_text())
        desc[extra] = "W4A8_DYNAMIC"
        (path / "quant_model_description.json").write_text(json.dumps(desc))
    _expect_error(path, "unexpected tensor", extra)


@pytest.mark.parametrize("fmt", FORMATS)
def test_wrong_shape(tmp_path, fmt):
    path = _write(tmp_path, fmt)
    name = f"{EXPERT}.gate_proj.weight"
    _edit_tensor(path, name, lambda t: torch.cat([t, t]))  # looks unpacked: [N, K]
    _expect_error(path, name, "[16, 64]", "found int8 [32, 64]")


@pytest.mark.parametrize("fmt", FORMATS)
def test_wrong_dtype(tmp_path, fmt):
    path = _write(tmp_path, fmt)
    name = f"{EXPERT}.down_proj.weight"
    _edit_tensor(path, name, lambda t: t.to(torch.bfloat16))
    _expect_error(path, name, "expected int8", "found bfloat16")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_bad_scale(tmp_path, fmt, bad):
    path = _write(tmp_path, fmt)
    name = f"{EXPERT}.gate_proj.weight_scale"

    def corrupt(t):
        if t.dtype == torch.uint64:
            s = t.view(torch.int64).to(torch.int32).view(torch.float32).clone()
            s[5, 0] = bad
            return (s.view(torch.int32).to(torch.int64) & 0xFFFFFFFF).view(torch.uint64)
        t[5, 0] = bad
        return t

    _edit_tensor(path, name, corrupt)
    _expect_error(path, name, "scales must be")


def test_uint64_scale_with_high_bits(tmp_path):
    path = _write(tmp_path, COMPRESSED_TENSORS)
    name = f"{EXPERT}.gate_proj.weight_scale"
    _edit_tensor(path, name, lambda t: (t.view(torch.int64) | (1 << 40)).view(torch.uint64))
    _expect_error(path, name, "high 32 bits")


@pytest.mark.parametrize("fmt", FORMATS)
def test_int4_minus_eight_rejected(tmp_path, fmt):
    path = _write(tmp_path, fmt)
    name = f"{EXPERT}.up_proj.weight"

    def put_minus_eight(t):
        t[2, 7] = (t[2, 7].view(torch.uint8) & 0xF0 | 0x08).view(torch.int8)
        return t

    _edit_tensor(path, name, put_minus_eight)
    _expect_error(path, name, "-8", "channel 4, column 7")


@pytest.mark.parametrize("fmt", FORMATS)
def test_inconsistent_bias(tmp_path, fmt):
    path = _write(tmp_path, fmt)
    name = f"{EXPERT}.gate_proj." + ("bias" if fmt == COMPRESSED_TENSORS else "scale_bias")
    scale_name = f"{EXPERT}.gate_proj.weight_scale"
    ckpt = open_checkpoint(path)
    scale = float(ckpt.load_moe_layer_tensors(1).scale["gate"][3, 11])
    # off by one quantum of the q-sum: the smallest error a wrong weight can make
    _edit_tensor(path, name, lambda t: t.index_put_((torch.tensor([11]),), t[11] + 8 * scale))
    msg = _expect_error(path, name, "8*s*sum(q)", "row 11")
    assert scale_name not in msg


def test_bias_of_split_down_projection_checked_per_chunk(tmp_path):
    path = _write(tmp_path, ASCENDV1)
    name = f"{EXPERT}.down_proj.scale_bias"
    # moving value between chunks keeps the row sum but breaks the per-chunk partial sums
    _edit_tensor(path, name, lambda t: t.index_put_((torch.tensor([4]), torch.tensor([0])), t[4, 0] + t[4, 1] + 1)
                 .index_put_((torch.tensor([4]), torch.tensor([1])), torch.tensor(-1.0)))
    _expect_error(path, name, "chunk")


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.2, float("nan")])
def test_alpha_out_of_range(tmp_path, bad):
    path = _write(tmp_path, COMPRESSED_TENSORS)
    name = f"{EXPERT}.down_proj.alpha"
    _edit_tensor(path, name, lambda t: torch.tensor(bad))
    _expect_error(path, name, "(0, 1]")


def test_nonzero_weight_offset(tmp_path):
    path = _write(tmp_path, ASCENDV1)
    name = f"{EXPERT}.gate_proj.weight_offset"
    _edit_tensor(path, name, lambda t: t + 1)
    _expect_error(path, name, "zeros")


@pytest.mark.parametrize("fmt", FORMATS)
def test_nan_in_router_and_other_tensors(tmp_path, fmt):
    path = _write(tmp_path, fmt)
    _edit_tensor(path, "model.norm.weight", lambda t: t.index_fill_(0, torch.tensor([3]), float("nan")))
    _expect_error(path, "model.norm.weight", "NaN")


def test_w8a8_linear_without_scale(tmp_path):
    path = _write(tmp_path, COMPRESSED_TENSORS)
    name = "model.layers.0.mlp.down_proj.weight_scale"
    _edit_tensor(path, name, lambda t: None)
    _drop_from_metadata(path, name)
    _expect_error(path, "missing tensor", name)


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_shard(tmp_path, fmt):
    path = _write(tmp_path, fmt)
    shard = sorted(path.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    _expect_error(path, shard.name, "truncated")


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_shard(tmp_path, fmt):
    path = _write(tmp_path, fmt)
    shard = sorted(path.glob("*.safetensors"))[0]
    shard.unlink()
    _expect_error(path, shard.name, "missing")


@pytest.mark.parametrize("corruption", ["garbage", "no weight_map", "wrong file"])
def test_corrupted_index(tmp_path, corruption):
    path = _write(tmp_path, COMPRESSED_TENSORS)
    idx = _index(path)
    if corruption == "garbage":
        idx.write_text('{"weight_map": {"a": ')
        _expect_error(path, idx.name, "corrupt index")
    elif corruption == "no weight_map":
        idx.write_text('{"metadata": {}}')
        _expect_error(path, idx.name, "corrupt index")
    else:
        data = json.loads(idx.read_text())
        name = f"{EXPERT}.up_proj.weight"
        shards = sorted(set(data["weight_map"].values()))
        data["weight_map"][name] = next(s for s in shards if s != data["weight_map"][name])
        idx.write_text(json.dumps(data))
        _expect_error(path, name, "not in the file")


def test_shard_holding_unindexed_tensor(tmp_path):
    path = _write(tmp_path, COMPRESSED_TENSORS)
    idx = _index(path)
    data = json.loads(idx.read_text())
    name = f"{EXPERT}.up_proj.bias"  # shares its shard with other tensors
    data["weight_map"].pop(name)
    idx.write_text(json.dumps(data))
    _expect_error(path, name, "not listed")


def test_stray_weight_file_not_in_index(tmp_path):
    path = _write(tmp_path, COMPRESSED_TENSORS)
    save_file({"x": torch.zeros(2)}, path / "model-00099.safetensors")
    _expect_error(path, "model-00099.safetensors", "not in the index")


def test_description_and_weights_disagree(tmp_path):
    path = _write(tmp_path, ASCENDV1)
    desc_path = path / "quant_model_description.json"
    desc = json.loads(desc_path.read_text())
    desc["model.layers.9.mlp.gate.weight"] = "FLOAT"
    desc.pop("model.norm.weight")
    desc_path.write_text(json.dumps(desc))
    _expect_error(path, "model.layers.9.mlp.gate.weight", "model.norm.weight")


def test_per_group_variant_refused_clearly(tmp_path):
    path = _write(tmp_path, ASCENDV1)
    desc_path = path / "quant_model_description.json"
    desc = json.loads(desc_path.read_text())
    desc["group_size"] = 256
    desc_path.write_text(json.dumps(desc))
    _expect_error(path, "group_size=256", "not supported")


def test_not_a_checkpoint_and_ambiguous(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    _expect_error(tmp_path, "not a W4A8 checkpoint")
    path = _write(tmp_path, ASCENDV1)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors"}
    (path / "config.json").write_text(json.dumps(cfg))
    _expect_error(path, "both")


def test_bad_quantization_config(tmp_path):
    path = _write(tmp_path, COMPRESSED_TENSORS)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_1"]["weights"]["num_bits"] = 8
    (path / "config.json").write_text(json.dumps(cfg))
    _expect_error(path, "num_bits", "expected 4")
    cfg["quantization_config"]["quant_method"] = "gptq"
    (path / "config.json").write_text(json.dumps(cfg))
    _expect_error(path, "quant_method", "gptq")


def test_all_problems_reported_at_once(tmp_path):
    path = _write(tmp_path, COMPRESSED_TENSORS)
    a, b = f"{EXPERT}.down_proj.alpha", "model.layers.2.mlp.experts.0.down_proj.alpha"
    _edit_tensor(path, a, lambda t: torch.tensor(2.0))
    _edit_tensor(path, b, lambda t: torch.tensor(0.0))
    _expect_error(path, a, b, "2 problem(s)")


def test_structure_only_open_skips_values_but_layers_are_checked(tmp_path):
    path = _write(tmp_path, COMPRESSED_TENSORS)
    name = f"{EXPERT}.down_proj.alpha"
    _edit_tensor(path, name, lambda t: torch.tensor(2.0))
    ckpt = open_checkpoint(path, validate="structure")
    with pytest.raises(CheckpointError, match="alpha"):
        ckpt.moe_layer(1)
    ckpt.moe_layer(2)  # the sound layer still loads


@pytest.mark.parametrize("tensor", ["weight", "e_score_correction_bias"])
def test_router_tensors_are_value_checked_by_name_under_any_open(tmp_path, tensor):
    path = _write(tmp_path, COMPRESSED_TENSORS)
    name = f"model.layers.1.mlp.gate.{tensor}"
    _edit_tensor(path, name, lambda t: t.index_fill_(-1, torch.tensor([2]), float("nan")))
    ckpt = open_checkpoint(path, validate="structure")
    with pytest.raises(CheckpointError, match=name):
        ckpt.load_router(1)
    weight, bias = ckpt.load_router(2)
    stored = load_file(ckpt.reader.infos["model.layers.2.mlp.gate.weight"].file)
    assert torch.equal(weight, stored["model.layers.2.mlp.gate.weight"])
    assert torch.equal(bias, stored["model.layers.2.mlp.gate.e_score_correction_bias"].float())
    with pytest.raises(CheckpointError, match="no W4A8 experts"):
        ckpt.load_router(0)
    _expect_error(path, name, "NaN")


def test_header_parser_rejects_garbage(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"\x05\x00")
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors_header(f)
    f.write_bytes((10).to_bytes(8, "little") + b"not json!!")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_safetensors_header(f)


def test_writer_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = _write(tmp_path, COMPRESSED_TENSORS)
    assert not [p for p in path.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_summary_memory_figures(tmp_path):
    s = open_checkpoint(_write(tmp_path, COMPRESSED_TENSORS)).summary()
    assert s["routed_expert_params"] == 2 * 8 * 3 * 64 * 32
    assert s["routed_expert_bytes_w8a8"] == 2 * s["routed_expert_bytes_w4"]
    assert np.isclose(s["routed_expert_bytes_bf16"] / s["routed_expert_bytes_w4"], 4.0)


def test_qwen3_moe_expert_count_under_either_key():
    cfg = tiny_config("qwen3_moe")
    cfg["num_local_experts"] = cfg.pop("num_experts")  # as transformers 5 saves it
    assert MoEModelConfig.from_dict(cfg).num_experts == 8
    del cfg["num_local_experts"]
    from w4a8moe.errors import ConfigError

    with pytest.raises(ConfigError, match="num_experts"):
        MoEModelConfig.from_dict(cfg)
