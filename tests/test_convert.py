"""``w4a8moe convert``: small transformers-built models (bf16 and block FP8) to both formats.

Every output must pass full validation; its MoE layers must equal an independent float
computation from the source weights fake-quantized with the checkpoint's scales; the
quantized values must be exactly round-to-nearest of the source weights under those scales.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from w4a8moe import open_checkpoint
from w4a8moe.cli import main as cli_main
from w4a8moe.convert import SourceCheckpoint, convert, dequantize_fp8_blockwise
from w4a8moe.convert.progress import MANIFEST, PROGRESS_DIR
from w4a8moe.convert.synthetic import make_fp8_checkpoint, make_hf_checkpoint, quantize_fp8_blockwise
from w4a8moe.errors import CheckpointError, ConfigError, ConversionError
from w4a8moe.formats.model_config import EXPERT_PROJECTIONS
from w4a8moe.models import tiny_config
from w4a8moe.quant import decode_scale_uint64, unpack_int4_pairs

CALIB = dict(calib_sequences=6, calib_seq_len=64, num_threads=1, progress=False)
FP8_BLOCK = (16, 24)  # ragged against hidden 64 / intermediate 32 / MLA dims


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    bf16 = make_hf_checkpoint(tiny_config("deepseek_v3"), root / "bf16", seed=0, max_shard_size="100KB",
                              outliers=True)
    (bf16 / "tokenizer_config.json").unlink(missing_ok=True)
    (bf16 / "modeling_extra.py").write_text("# model code travels with the checkpoint\n")
    fp8 = make_fp8_checkpoint(bf16, root / "fp8", block=FP8_BLOCK)
    return {"bf16": bf16, "fp8": fp8}


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory) -> dict[tuple[str, str], tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for src_kind in ("bf16", "fp8"):
        for fmt in ("compressed-tensors", "ascendv1"):
            dst = root / f"{src_kind}-{fmt}"
            out[(src_kind, fmt)] = (dst, convert(sources[src_kind], dst, fmt=fmt, max_shard_bytes=60_000, **CALIB))
    return out


def _dir_bytes(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _source_float(src: Path, name: str) -> torch.Tensor:
    return SourceCheckpoint(src).load_float(name)


# ------------------------------------------------------------------------- FP8
def _slow_fp8_dequant(w: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    out = torch.empty(w.shape, dtype=torch.float32)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            out[i, j] = float(w[i, j].to(torch.float32)) * float(s[i // block[0], j // block[1]])
    return out


@pytest.mark.parametrize("shape,block", [((300, 200), (128, 128)), ((40, 50), (16, 24)), ((128, 256), (128, 128))])
def test_fp8_dequant_matches_slow_reference_with_ragged_edges(shape, block):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(*shape, generator=g) * 50).to(torch.float8_e4m3fn)
    grid = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    s = torch.rand(*grid, generator=g) + 0.01
    assert torch.equal(dequantize_fp8_blockwise(w, s, block), _slow_fp8_dequant(w, s, block))


def test_fp8_dequant_rejects_wrong_scale_grid():
    w = torch.zeros(300, 200, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"needs \(3, 2\)"):
        dequantize_fp8_blockwise(w, torch.ones(2, 2), (128, 128))


def test_fp8_round_trip_of_the_test_quantizer():
    w = torch.randn(300, 200)
    q, s = quantize_fp8_blockwise(w, (128, 128))
    assert s.shape == (3, 2)
    rel = (dequantize_fp8_blockwise(q, s, (128, 128)) - w).abs().max() / w.abs().max()
    assert rel < 0.07  # e4m3: 3 mantissa bits


def test_fp8_source_reads_dequantized(sources):
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    fp8 = SourceCheckpoint(sources["fp8"])
    assert fp8.is_fp8 and fp8.fp8_block == FP8_BLOCK
    with safe_open(str(next(p for p in sources["fp8"].glob("*.safetensors") if name in safe_open(str(p), "pt").keys())),
                   "pt") as fh:
        raw, scale = fh.get_tensor(name), fh.get_tensor(name + "_scale_inv")
    assert raw.dtype == torch.float8_e4m3fn
    assert torch.equal(fp8.load(name), _slow_fp8_dequant(raw, scale, FP8_BLOCK))
    assert "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv" not in fp8.names()


# ------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("src_kind", ["bf16", "fp8"])
@pytest.mark.parametrize("fmt", ["compressed-tensors", "ascendv1"])
def test_output_validates_and_records_policy(converted, sources, src_kind, fmt):
    dst, report = converted[(src_kind, fmt)]
    ckpt = open_checkpoint(dst)  # full validation
    assert ckpt.format == fmt
    assert ckpt.moe_layers == [1, 2]
    assert ckpt.activation_use_clip == (fmt == "compressed-tensors")
    infos = ckpt.reader.infos
    # Policy: attention/dense MLP/shared experts W8A8, MLA kv_a/kv_b, router, embeddings, lm_head float.
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
                 "model.layers.2.self_attn.o_proj.weight", "model.layers.1.mlp.shared_experts.up_proj.weight"):
        assert infos[name].dtype == torch.int8, name
        assert name.replace(".weight", ".weight_scale") in infos
    for name in ("model.layers.1.self_attn.kv_a_proj_with_mqa.weight", "model.layers.1.self_attn.kv_b_proj.weight",
                 "model.layers.1.mlp.gate.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert infos[name].dtype == torch.bfloat16, name
    assert not any(n.endswith("_scale_inv") for n in infos)
    config = json.loads((dst / "config.json").read_text())
    meta = config["w4a8moe"]
    assert meta["format"] == fmt and meta["w4a8_moe_layers"] == [1, 2]
    assert r"\.kv_b_proj$" in meta["policy"]["keep_bf16_patterns"]
    if fmt == "compressed-tensors":
        ignore = config["quantization_config"]["ignore"]
        assert "lm_head" in ignore and "model.layers.1.mlp.gate" in ignore
        assert "model.layers.1.self_attn.kv_b_proj" in ignore
        assert "model.layers.1.self_attn.q_proj" not in ignore
    else:
        assert "quantization_config" not in config
    assert (dst / "generation_config.json").exists() and (dst / "modeling_extra.py").exists()
    assert not (dst / PROGRESS_DIR).exists()
    on_disk = json.loads((dst / "conversion_report.json").read_text())
    assert on_disk["units"] == report["units"]
    assert report["memory"]["peak_rss_bytes"] > 0


def _independent_moe(ckpt, layer: int, source: Path, x: torch.Tensor) -> torch.Tensor:
    """The MoE block from the *source* weights fake-quantized with the checkpoint's scales.

    Everything in float64, routing re-implemented here: sigmoid scores, group-limited top-k
    with the correction bias, unbiased weights renormalised, times the scaling factor; each
    token's activations rounded to its int8 grid; SwiGLU output clipped at alpha * max and
    rounded to its int8 grid; shared expert W8A8.
    """
    mc = ckpt.model_config
    names = mc.names
    r = mc.routing
    src = SourceCheckpoint(source)
    prefix = names.layer_prefix(layer)
    x = x.to(torch.float64)

    def fq_rows(t: torch.Tensor) -> torch.Tensor:
        a = t.abs().amax(-1, keepdim=True) / 127
        return torch.round(t / torch.where(a > 0, a, 1)) * a

    def stored_scale(base: str) -> torch.Tensor:
        s = ckpt.reader.get(base + ".weight_scale")
        return (decode_scale_uint64(s) if s.dtype == torch.uint64 else s).to(torch.float64).reshape(-1)

    def fq_int4(base: str, source_name: str) -> torch.Tensor:
        s = stored_scale(base).to(torch.float32)
        w = src.load_float(source_name)
        return (torch.clamp(torch.round(w / s[:, None]), -7, 7) * s[:, None]).to(torch.float64)

    router = ckpt.reader.get(f"{prefix}.gate.weight").to(torch.float64)
    bias = ckpt.reader.get(f"{prefix}.gate.e_score_correction_bias").to(torch.float64)
    scores = torch.sigmoid(x @ router.T)
    biased = scores + bias
    per_group = r.num_experts // r.n_group
    out = torch.zeros_like(x)
    for m in range(x.shape[0]):
        groups = biased[m].reshape(r.n_group, per_group)
        gscore = groups.topk(2, dim=-1).values.sum(-1)
        keep = gscore.topk(r.topk_group).indices
        mask = torch.full((r.num_experts,), float("-inf"), dtype=torch.float64)
        for g in keep.tolist():
            mask[g * per_group:(g + 1) * per_group] = 0
        ids = (biased[m] + mask).topk(r.top_k).indices
        w = scores[m, ids] / scores[m, ids].sum()
        xm = fq_rows(x[m:m + 1])
        for weight, e in zip(w.tolist(), ids.tolist()):
            wq = {p: fq_int4(names.expert_weight(layer, e, p), names.expert_weight(layer, e, p) + ".weight")
                  for p in EXPERT_PROJECTIONS}
            alpha = 1.0
            if ckpt.activation_use_clip:
                alpha = float(ckpt.reader.get(names.expert_weight(layer, e, "down") + ".alpha"))
            g, u = xm @ wq["gate"].T, xm @ wq["up"].T
            h = torch.nn.functional.silu(g) * u
            bound = alpha * h.abs().amax(-1, keepdim=True)
            hc = torch.clamp(h, -bound, bound)
            step = bound / 127
            hq = torch.round(hc / torch.where(step > 0, step, 1)) * step
            out[m] += r.routed_scaling_factor * weight * (hq @ wq["down"].T)[0]
    shared = {}
    for p in EXPERT_PROJECTIONS:
        base = names.shared_weight(layer, p)
        s = stored_scale(base).to(torch.float32)
        w = src.load_float(base + ".weight")
        shared[p] = (torch.clamp(torch.round(w / s[:, None]), -127, 127) * s[:, None]).to(torch.float64)
    xs = fq_rows(x)
    hs = torch.nn.functional.silu(xs @ shared["gate"].T) * (xs @ shared["up"].T)
    return out + fq_rows(hs) @ shared["down"].T


@pytest.mark.parametrize("src_kind", ["bf16", "fp8"])
@pytest.mark.parametrize("fmt", ["compressed-tensors", "ascendv1"])
def test_moe_layers_match_fake_quantized_source(converted, sources, src_kind, fmt):
    dst, _ = converted[(src_kind, fmt)]
    ckpt = open_checkpoint(dst)
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(24, ckpt.model_config.hidden_size, generator=g)).to(torch.bfloat16)
    for layer in ckpt.moe_layers:
        got = ckpt.moe_layer(layer, backend="reference")(x).to(torch.float64)
        want = _independent_moe(ckpt, layer, sources[src_kind], x)
        rel = float((got - want).norm() / want.norm())
        assert rel < 2e-2, (layer, rel)  # bf16 intermediate outputs of the runtime


@pytest.mark.parametrize("src_kind", ["bf16", "fp8"])
def test_int4_values_are_round_to_nearest_of_the_source(converted, sources, src_kind):
    """q == clamp(round(W / s)) exactly, and |W - q s| <= s/2 on every unclipped channel."""
    dst, _ = converted[(src_kind, "compressed-tensors")]
    ckpt = open_checkpoint(dst)
    src = SourceCheckpoint(sources[src_kind])
    names = ckpt.model_config.names
    clipped_channels = 0
    for layer in ckpt.moe_layers:
        for e in range(ckpt.model_config.num_experts):
            for p in EXPERT_PROJECTIONS:
                base = names.expert_weight(layer, e, p)
                q = unpack_int4_pairs(ckpt.reader.get(base + ".weight")).to(torch.float64)
                s32 = decode_scale_uint64(ckpt.reader.get(base + ".weight_scale")).reshape(-1, 1)
                w32 = src.load_float(base + ".weight")
                # SPEC 1 in fp32, the precision the scales are stored in.
                assert torch.equal(q, torch.clamp(torch.round(w32 / s32), -7, 7).to(torch.float64)), base
                s, w = s32.to(torch.float64), w32.to(torch.float64)
                amax = w.abs().amax(-1, keepdim=True)
                unclipped = torch.isclose(s * 7, amax, rtol=1e-6, atol=0).reshape(-1)
                clipped_channels += int((~unclipped).sum())
                err = (w - q * s).abs()[unclipped]
                assert bool((err <= s.expand_as(w)[unclipped] / 2 * (1 + 1e-6)).all()), base
    assert clipped_channels > 0  # learned weight clips are in use on this outlier model


def test_no_learn_is_plain_round_to_nearest(sources, tmp_path):
    report = convert(sources["bf16"], tmp_path / "rtn", learn=False, progress=False)
    ckpt = open_checkpoint(tmp_path / "rtn")
    names = ckpt.model_config.names
    for layer in ckpt.moe_layers:
        for e in range(ckpt.model_config.num_experts):
            assert float(ckpt.reader.get(names.expert_weight(layer, e, "down") + ".alpha")) == 1.0
            for p in EXPERT_PROJECTIONS:
                base = names.expert_weight(layer, e, p)
                w = _source_float(sources["bf16"], base + ".weight")
                s = decode_scale_uint64(ckpt.reader.get(base + ".weight_scale")).reshape(-1)
                assert torch.equal(s, w.abs().amax(-1) / 7)
    assert report["calibration"] is None and report["units"]["layer_1"]["moe"] == {"experts": 8}


def test_learned_clips_lower_the_calibration_layer_error(converted):
    _, report = converted[("bf16", "compressed-tensors")]
    for layer in (1, 2):
        moe = report["units"][f"layer_{layer}"]["moe"]
        assert moe["layer_rel_err_learned"] < moe["layer_rel_err_rtn"]
        assert moe["calibration_tokens"] == 6 * 64
        assert sum(e["tokens"] for e in moe["per_expert"]) == 6 * 64 * 4  # top-4
        for e in moe["per_expert"]:
            assert e["rel_err_learned"] <= e["rel_err_rtn"]


# ------------------------------------------------------------------------- resume
def test_injected_failure_then_resume_is_byte_identical(sources, tmp_path):
    kwargs = dict(fmt="compressed-tensors", max_shard_bytes=30_000, **CALIB)
    reference = tmp_path / "reference"
    convert(sources["fp8"], reference, **kwargs)
    dst = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="injected failure"):
        convert(sources["fp8"], dst, _fail_after_shards=3, **kwargs)
    manifest = json.loads((dst / PROGRESS_DIR / MANIFEST).read_text())
    assert len(set(manifest["weight_map"].values())) == 3
    assert manifest["resume_unit"] >= 1 and manifest["hidden_file"]
    assert not (dst / "model.safetensors.index.json").exists() and not (dst / "config.json").exists()
    # What a hard crash leaves behind: a temp file and a shard renamed but never recorded.
    (dst / ".model-00004.safetensors.abc.tmp").write_bytes(b"partial")
    (dst / "model-00004.safetensors").write_bytes(b"not recorded")
    with pytest.raises(ConversionError, match="not empty"):
        convert(sources["fp8"], dst, **kwargs)
    with pytest.raises(ConversionError, match="different settings"):
        convert(sources["fp8"], dst, resume=True, **{**kwargs, "max_shard_bytes": 40_000})
    report = convert(sources["fp8"], dst, resume=True, **kwargs)
    assert report["timing"]["resumed_from_unit"] == manifest["resume_unit"]
    assert _dir_bytes(dst) == _dir_bytes(reference)
    # A finished folder: resuming with its settings does nothing; with others it is refused.
    assert cli_main(["convert", str(sources["fp8"]), str(dst), "--resume", "--quiet", "--format", "compressed-tensors",
                     "--calib-sequences", "6", "--calib-seq-len", "64", "--threads", "1",
                     "--max-shard-size", "30000"]) == 0
    assert _dir_bytes(dst) == _dir_bytes(reference)
    with pytest.raises(ConversionError, match="holds files but no"):
        convert(sources["fp8"], dst, resume=True, **{**kwargs, "max_shard_bytes": 40_000})
    (dst / "model-00002.safetensors").unlink()
    with pytest.raises(ConversionError, match="finished, but its files are damaged.*model-00002"):
        convert(sources["fp8"], dst, resume=True, **kwargs)


V1_CLIP_SEARCH_FIELDS = {"weight_clip_grid", "alpha_grid", "refine_steps", "refine_lr", "min_expert_tokens",
                         "learn_weight_clip", "learn_alpha", "gptq"}
"""The clip settings converter version 1 recorded (and hashed), as it wrote them."""


def test_refine_form_direct_is_converter_version_1(sources, tmp_path):
    from w4a8moe.calibrate import ClipSearchSettings

    kwargs = dict(fmt="compressed-tensors", max_shard_bytes=30_000, **CALIB)
    direct = ClipSearchSettings(refine_form="direct")
    dst = tmp_path / "direct"
    with pytest.raises(RuntimeError, match="injected failure"):
        convert(sources["bf16"], dst, _fail_after_shards=1, clip_settings=direct, **kwargs)
    # Version 2's default (the Gram form) may round otherwise: it does not resume version 1's run.
    with pytest.raises(ConversionError, match="different settings.*--refine-form direct"):
        convert(sources["bf16"], dst, resume=True, **kwargs)
    convert(sources["bf16"], dst, resume=True, clip_settings=direct, **kwargs)
    recorded = json.loads((dst / "config.json").read_text())["w4a8moe"]
    assert recorded["converter_version"] == 1 and set(recorded["clip_search"]) == V1_CLIP_SEARCH_FIELDS
    gram = tmp_path / "gram"
    convert(sources["bf16"], gram, **kwargs)
    recorded = json.loads((gram / "config.json").read_text())["w4a8moe"]
    assert recorded["converter_version"] == 2 and recorded["clip_search"]["refine_form"] == "gram"
    # The two forms take the same gradient, rounded otherwise (and differently on other CPUs,
    # whose BLAS kernels sum in other orders): a refinement path may end a few ulps apart. So
    # the weights are the same tensors but for such an alpha (and the down clips chosen for it),
    # and the learned errors agree.
    _assert_same_clips_but_rounding(dst, gram)


def _assert_same_clips_but_rounding(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    def tensors(d: Path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    moved = {k.rsplit(".", 2)[0] for k in ta if k.endswith(".alpha") and not torch.equal(ta[k], tb[k])}
    for k in ta:
        if k.endswith(".alpha"):
            assert torch.allclose(ta[k], tb[k], rtol=1e-5, atol=0), k
        elif not any(k.startswith(e + ".down_proj") for e in moved):
            assert torch.equal(ta[k], tb[k]), k
    for unit, rep in json.loads((a / "conversion_report.json").read_text())["units"].items():
        other = json.loads((b / "conversion_report.json").read_text())["units"][unit]
        for ea, eb in zip(rep.get("moe", {}).get("per_expert", []), other.get("moe", {}).get("per_expert", [])):
            assert math.isclose(ea["rel_err_learned"], eb["rel_err_learned"], rel_tol=1e-3), (unit, ea, eb)


# ------------------------------------------------------------------------- policy / families / CLI
def test_keep_bf16_override(sources, tmp_path):
    convert(sources["bf16"], tmp_path / "o", learn=False, progress=False, keep_bf16=[r"\.o_proj$"])
    ckpt = open_checkpoint(tmp_path / "o")
    infos = ckpt.reader.infos
    assert infos["model.layers.0.self_attn.o_proj.weight"].dtype == torch.bfloat16
    assert infos["model.layers.0.self_attn.kv_b_proj.weight"].dtype == torch.int8  # default pattern dropped
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert "model.layers.0.self_attn.o_proj" in config["quantization_config"]["ignore"]
    assert config["w4a8moe"]["policy"]["keep_bf16_patterns"] == [r"\.o_proj$"]
    with pytest.raises(ConversionError, match="some but not all routed experts"):
        convert(sources["bf16"], tmp_path / "bad", learn=False, progress=False, keep_bf16=[r"experts\.3\."])


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "olmoe", "qwen3_moe"])
def test_other_families_convert_and_validate(tmp_path, family):
    src = make_hf_checkpoint(tiny_config(family), tmp_path / "src", seed=3, outliers=True)
    config = json.loads((src / "config.json").read_text())
    if "num_local_experts" in config and family != "mixtral":
        # transformers 5 saves Qwen3-MoE's expert count under its internal alias; released
        # checkpoints (and MoEModelConfig) use "num_experts".
        config["num_experts"] = config.pop("num_local_experts")
        (src / "config.json").write_text(json.dumps(config))
    report = convert(src, tmp_path / "dst", calib_sequences=4, calib_seq_len=32, num_threads=1, progress=False)
    ckpt = open_checkpoint(tmp_path / "dst")
    assert ckpt.moe_layers == list(range(3))
    for layer in ckpt.moe_layers:
        moe = report["units"][f"layer_{layer}"]["moe"]
        assert moe["layer_rel_err_learned"] <= moe["layer_rel_err_rtn"]


def test_cli_convert_prints_summary(sources, tmp_path, capsys):
    rc = cli_main(["convert", str(sources["bf16"]), str(tmp_path / "c"), "--no-learn", "--quiet"])
    assert rc == 0
    assert "2 W4A8 MoE layers" in capsys.readouterr().out
    assert cli_main(["verify", str(tmp_path / "c")]) == 0
    assert cli_main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "d"), "--quiet"]) == 2


# ------------------------------------------------------------------------- malformed sources
def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _drop_tensor(directory: Path, name: str) -> None:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard = directory / index["weight_map"].pop(name)
    with safe_open(str(shard), "pt") as fh:
        kept = {k: fh.get_tensor(k) for k in fh.keys() if k != name}
    save_file(kept, str(shard), metadata={"format": "pt"})
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def test_missing_expert_tensor_is_named(sources, tmp_path):
    src = _copy(sources["bf16"], tmp_path / "src")
    _drop_tensor(src, "model.layers.2.mlp.experts.5.up_proj.weight")
    with pytest.raises(ConversionError, match=r"missing tensor 'model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight'"):
        convert(src, tmp_path / "dst", learn=False, progress=False)


def test_missing_attention_tensor_is_named_when_calibrating(sources, tmp_path):
    src = _copy(sources["bf16"], tmp_path / "src")
    _drop_tensor(src, "model.layers.1.self_attn.o_proj.weight")
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight"):
        convert(src, tmp_path / "dst", **CALIB)


def test_missing_fp8_scale_is_named(sources, tmp_path):
    src = _copy(sources["fp8"], tmp_path / "src")
    _drop_tensor(src, "model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv")
    with pytest.raises(ConversionError, match=r"experts\.0\.gate_proj\.weight.*no block scales"):
        convert(src, tmp_path / "dst", learn=False, progress=False)


def test_missing_shard_is_named(sources, tmp_path):
    src = _copy(sources["bf16"], tmp_path / "src")
    (src / "model-00003-of-00005.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard model-00003-of-00005\.safetensors is missing"):
        convert(src, tmp_path / "dst", learn=False, progress=False)


def test_unsupported_model_type(sources, tmp_path):
    src = _copy(sources["bf16"], tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="'llama' is not a supported MoE family"):
        convert(src, tmp_path / "dst", learn=False, progress=False)


def test_misshapen_expert_is_named(sources, tmp_path):
    src = _copy(sources["bf16"], tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["moe_intermediate_size"] = 48
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"gate\.weight|experts\.0\.gate_proj\.weight.*shape"):
        convert(src, tmp_path / "dst", learn=False, progress=False)


def test_missing_first_expert_is_not_mistaken_for_a_dense_layer(sources, tmp_path):
    src = _copy(sources["bf16"], tmp_path / "src")
    _drop_tensor(src, "model.layers.1.mlp.experts.0.down_proj.weight")
    with pytest.raises(ConversionError, match=r"missing tensor 'model\.layers\.1\.mlp\.experts\.0\.down_proj\.weight'"):
        convert(src, tmp_path / "dst", learn=False, progress=False)


def test_calibration_tokenizer_choice(sources, tmp_path):
    from w4a8moe.convert.pipeline import calibration_tokens
    from w4a8moe.data import ByteTokenizer, load_text
    from w4a8moe.models.trained import write_byte_tokenizer

    source = SourceCheckpoint(sources["bf16"])
    ids, info = calibration_tokens(source, None, None, 2, 32)
    assert info["tokenizer"].startswith("byte tokenizer (fallback")
    assert torch.equal(ids.reshape(-1), ByteTokenizer().encode(load_text("calib"))[:64])
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    write_byte_tokenizer(tok_dir)
    text = tmp_path / "calib.txt"
    text.write_text("To be, or not to be: that is the question. " * 10)
    ids2, info2 = calibration_tokens(source, text, tok_dir, 4, 32)
    assert info2["tokenizer"] == "given folder" and info2["text"] == "file"
    assert torch.equal(ids2.reshape(-1), ByteTokenizer().encode(text.read_text())[:128])
    small = _copy(sources["bf16"], tmp_path / "small-vocab")
    config = json.loads((small / "config.json").read_text())
    config["vocab_size"] = 200
    (small / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="vocab_size is 200"):
        calibration_tokens(SourceCheckpoint(small), None, None, 2, 32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fp16_and_fp32_sources(tmp_path, dtype):
    src = make_hf_checkpoint(tiny_config("deepseek_v3"), tmp_path / "src", seed=4, dtype=dtype)
    assert SourceCheckpoint(src).compute_dtype() == dtype
    report = convert(src, tmp_path / "dst", calib_sequences=2, calib_seq_len=32, num_threads=1, progress=False)
    ckpt = open_checkpoint(tmp_path / "dst")
    assert ckpt.reader.infos["model.norm.weight"].dtype == dtype  # kept tensors stay as the source has them
    assert report["units"]["layer_1"]["moe"]["layer_rel_err_learned"] is not None
