"""The format objects: identity, registry, detection, tensor specs, scale and bias checks, the
pinned bytes of both formats, the ``modelslim`` spelling, and the lazy compressed-tensors import."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from w4a8moe import CheckpointError, ConversionError, open_checkpoint, write_checkpoint
from w4a8moe.formats import (
    ASCENDV1,
    COMPRESSED_TENSORS,
    FORMATS,
    AscendV1Format,
    CheckpointFormat,
    CompressedTensorsFormat,
    MoEModelConfig,
    detect_format,
    get_format,
    quantize_moe_layer,
)
from w4a8moe.models.synthetic import random_float_moe_layer, tiny_config
from w4a8moe.quant import decode_scale_uint64, encode_scale_uint64, pack_int4_pairs, unpack_int4_pairs

EXPERT_PROJ = ("gate", "up", "down")


def _write(path: Path, fmt, model_type: str = "deepseek_v3", **kw) -> Path:
    """A small two-MoE-layer checkpoint from seeded inputs (the same bytes on every run)."""
    cfg = tiny_config(model_type)
    mc = MoEModelConfig.from_dict(cfg)
    alpha = torch.linspace(0.5, 1.0, mc.num_experts)
    layers = {1: random_float_moe_layer(cfg, seed=1, alpha=alpha), 2: random_float_moe_layer(cfg, seed=2)}
    g = torch.Generator().manual_seed(0)
    others = {"model.embed_tokens.weight": torch.randn(cfg["vocab_size"], cfg["hidden_size"], generator=g).to(torch.bfloat16),
              "model.norm.weight": torch.ones(cfg["hidden_size"], dtype=torch.bfloat16),
              "lm_head.weight": torch.randn(cfg["vocab_size"], cfg["hidden_size"], generator=g).to(torch.bfloat16)}
    w8 = {"model.layers.0.mlp.down_proj.weight": torch.randn(cfg["hidden_size"], 128, generator=g)}
    return write_checkpoint(path, cfg, layers, fmt, other_tensors=others, w8a8_linears=w8,
                            max_shard_bytes=64 * 1024, **kw)


def _file_digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def _folder_digest(path: Path) -> str:
    return hashlib.sha256(json.dumps(_file_digests(path), sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- identity and registry
def test_format_objects_compare_hash_and_print_as_their_name():
    assert COMPRESSED_TENSORS == "compressed-tensors" and ASCENDV1 == "ascendv1"
    assert "compressed-tensors" == COMPRESSED_TENSORS  # reflected
    assert COMPRESSED_TENSORS != ASCENDV1 and COMPRESSED_TENSORS != "ascendv1"
    assert COMPRESSED_TENSORS != 3
    assert str(ASCENDV1) == "ascendv1" and f"{ASCENDV1:>10}" == "  ascendv1"
    assert repr(ASCENDV1) == "<AscendV1Format 'ascendv1'>"
    assert {ASCENDV1: 1}["ascendv1"] == 1 and hash(COMPRESSED_TENSORS) == hash("compressed-tensors")
    assert isinstance(ASCENDV1, AscendV1Format) and isinstance(COMPRESSED_TENSORS, CompressedTensorsFormat)
    assert all(isinstance(f, CheckpointFormat) for f in FORMATS.values())


def test_registry_resolves_names_and_objects_and_refuses_others():
    assert list(FORMATS) == ["ascendv1", "compressed-tensors"]
    assert get_format("ascendv1") is ASCENDV1 and get_format(COMPRESSED_TENSORS) is COMPRESSED_TENSORS
    for bad in ("AscendV1", "gptq", None, 3):
        with pytest.raises(ValueError, match="fmt must be one of"):
            get_format(bad)
    with pytest.raises(ValueError, match="fmt must be one of"):
        write_checkpoint("/nonexistent/never-created", tiny_config(), {}, "gguf")


def test_write_options_validate_each_format():
    assert ASCENDV1.write_options().activation_use_clip is False
    assert ASCENDV1.write_options().quant_method is None
    opts = COMPRESSED_TENSORS.write_options()
    assert opts.activation_use_clip is True and opts.quant_method == "compressed-tensors"
    assert COMPRESSED_TENSORS.write_options(False, "modelslim").quant_method == "modelslim"
    with pytest.raises(ValueError, match="no activation clip"):
        ASCENDV1.write_options(activation_use_clip=True)
    with pytest.raises(ValueError, match="no quant_method"):
        ASCENDV1.write_options(quant_method="modelslim")
    with pytest.raises(ValueError, match="quant_method must be one of"):
        COMPRESSED_TENSORS.write_options(quant_method="ModelSlim")


def test_detect_by_marker(tmp_path):
    ct, av = _write(tmp_path / "ct", "compressed-tensors"), _write(tmp_path / "av", "ascendv1")
    assert detect_format(ct) is COMPRESSED_TENSORS and detect_format(av) is ASCENDV1
    assert COMPRESSED_TENSORS.detect(ct) and not ASCENDV1.detect(ct)
    assert ASCENDV1.detect(av) and not COMPRESSED_TENSORS.detect(av)
    ckpt = open_checkpoint(av, validate="structure")
    assert ckpt.format is ASCENDV1 and ckpt.format == "ascendv1" and ckpt.summary()["format"] == "ascendv1"
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps(tiny_config()))
    with pytest.raises(CheckpointError, match="not a W4A8 checkpoint"):
        detect_format(tmp_path / "plain")


# ---------------------------------------------------------------- specs agree with what is written
@pytest.mark.parametrize("fmt,with_alpha", [(ASCENDV1, False), (COMPRESSED_TENSORS, False), (COMPRESSED_TENSORS, True)],
                         ids=["ascendv1", "compressed-tensors", "compressed-tensors-alpha"])
def test_expert_tensor_specs_describe_exactly_what_the_format_writes(fmt, with_alpha):
    cfg = tiny_config("deepseek_v3")
    mc = MoEModelConfig.from_dict(cfg)
    q = quantize_moe_layer(random_float_moe_layer(cfg, seed=3))
    for proj in EXPERT_PROJ:
        n, k = mc.projection_shape(proj)
        prefix = f"model.layers.1.mlp.experts.0.{proj}_proj"
        specs = fmt.expert_tensor_specs(prefix, proj, n, k, mc.hidden_size, with_alpha)
        alpha = torch.tensor(0.75) if with_alpha else None
        tensors = {f"{prefix}.{s}": t for s, t in fmt.expert_tensors(proj, q.packed[proj][0], q.scale[proj][0], alpha).items()}
        assert set(tensors) == set(specs), proj
        for name, t in tensors.items():
            assert t.dtype in specs[name].dtypes and tuple(t.shape) in specs[name].shapes, name
        # The stored scale decodes to the quantizer's scale, bit for bit.
        assert torch.equal(fmt.decode_scale(tensors[f"{prefix}.weight_scale"]), q.scale[proj][0])
        bias = tensors[f"{prefix}.{fmt.kernel_bias_suffix(proj)}"]
        assert fmt.check_kernel_bias("b", bias, unpack_int4_pairs(q.packed[proj][0]), q.scale[proj][0]) is None
    lin = fmt.linear_tensors(torch.ones(6, 4, dtype=torch.int8), torch.full((6,), 0.5))
    lin_specs = fmt.linear_tensor_specs("x", 6, 4)
    assert {f"x.{s}" for s in lin} == set(lin_specs)
    for s, t in lin.items():
        assert t.dtype in lin_specs[f"x.{s}"].dtypes and tuple(t.shape) in lin_specs[f"x.{s}"].shapes


def test_documented_layouts():
    # AscendV1 (SPEC 5): fp32 scale, zero offset, [N,1] bias; the down bias as 16 K-chunks [H,16].
    av = ASCENDV1.expert_specs("down", 64, 32, 64, False)
    assert set(av) == {"weight", "weight_scale", "weight_offset", "scale_bias"}
    assert av["scale_bias"].shapes == ((64, 16),) and ASCENDV1.expert_specs("up", 32, 64, 64, False)["scale_bias"].shapes == ((32, 1),)
    # compressed-tensors (SPEC 6): uint64 scales, bias [N], alpha [] on the down projection only.
    ct = COMPRESSED_TENSORS.expert_specs("down", 64, 32, 64, True)
    assert set(ct) == {"weight", "weight_scale", "bias", "alpha"} and ct["bias"].shapes == ((64,),)
    assert "alpha" not in COMPRESSED_TENSORS.expert_specs("gate", 32, 64, 64, True)
    t = COMPRESSED_TENSORS.expert_tensors("gate", torch.zeros(16, 64, dtype=torch.int8), torch.full((32,), 0.25))
    assert t["weight_scale"].dtype == torch.uint64


# ---------------------------------------------------------------- scale and bias checks
def test_decode_scale_both_encodings_and_high_bits_refused():
    s = torch.rand(9, 1) + 1e-3
    enc = encode_scale_uint64(s)
    for fmt in FORMATS.values():
        assert torch.equal(fmt.decode_scale(enc), s.reshape(-1))
        assert torch.equal(fmt.decode_scale(s), s.reshape(-1))
    with pytest.raises(ValueError, match="high 32 bits"):
        COMPRESSED_TENSORS.decode_scale((enc.view(torch.int64) | (1 << 33)).view(torch.uint64))
    problems: list[str] = []
    get = {"a": torch.tensor([[1.0], [0.0]]), "b": torch.tensor([[float("nan")]])}.__getitem__
    assert COMPRESSED_TENSORS.load_scale("a", get, problems) is None
    assert COMPRESSED_TENSORS.load_scale("b", get, problems) is None
    assert "'a'" in problems[0] and "> 0" in problems[0] and "finite" in problems[1]


def _slow_bias_rows(q: torch.Tensor, scale: torch.Tensor, chunks: int) -> list[list[float]]:
    n, k = q.shape
    width = k // chunks
    return [[8.0 * float(scale[r]) * sum(int(v) for v in q[r, c * width:(c + 1) * width]) for c in range(chunks)]
            for r in range(n)]


@pytest.mark.parametrize("chunks", [1, 16])
def test_check_kernel_bias_against_a_slow_reference(chunks):
    g = torch.Generator().manual_seed(5)
    n, k = 12, 64
    q = torch.randint(-7, 8, (n, k), generator=g, dtype=torch.int8)
    q[3] = 7  # a saturated row
    q[4] = 0  # an all-zero row
    scale = torch.rand(n, generator=g) * 1e-2 + 1e-4
    exact = torch.tensor(_slow_bias_rows(q, scale, chunks), dtype=torch.float32)
    stored = exact if chunks > 1 else exact.reshape(n)
    fmt = ASCENDV1 if chunks > 1 else COMPRESSED_TENSORS
    assert fmt.check_kernel_bias("b", stored, q, scale) is None
    assert ASCENDV1.check_kernel_bias("b", exact.reshape(n, chunks) if chunks > 1 else exact.reshape(n, 1), q, scale) is None
    off = stored.clone()
    off.view(-1)[7 * chunks] += 8 * float(scale[7])  # one quantum of the q-sum at row 7
    msg = fmt.check_kernel_bias("b", off, q, scale)
    assert msg is not None and "row 7" in msg and "8*s*sum(q)" in msg
    nan = stored.clone()
    nan.view(-1)[0] = float("nan")
    assert "NaN" in fmt.check_kernel_bias("b", nan, q, scale)


def test_load_expert_projection_reports_every_defect():
    q = torch.randint(-7, 8, (8, 32), dtype=torch.int8)
    q[2, 5] = -8
    packed = pack_int4_pairs(q)
    scale = torch.full((8,), 0.1)
    stored = ASCENDV1.expert_tensors("up", packed, scale)
    stored["weight_offset"] = stored["weight_offset"] + 1
    stored["scale_bias"][1, 0] += 1.0
    problems: list[str] = []
    loaded = ASCENDV1.load_expert_projection("p", "up", lambda name: stored[name.split(".", 1)[1]], problems)
    assert torch.equal(loaded.weight, packed) and torch.equal(loaded.scale, scale) and loaded.alpha is None
    text = "\n".join(problems)
    assert "-8 at channel 2, column 5" in text and "'p.weight_offset'" in text and "'p.scale_bias'" in text
    ct = COMPRESSED_TENSORS.expert_tensors("down", pack_int4_pairs(q.clamp(-7, 7)), scale, torch.tensor(1.5))
    problems = []
    loaded = COMPRESSED_TENSORS.load_expert_projection("p", "down", lambda n: ct[n.split(".", 1)[1]], problems, True)
    assert loaded.alpha is None and len(problems) == 1 and "(0, 1]" in problems[0]


# ---------------------------------------------------------------- bytes
# sha256 over the sorted per-file sha256s of ``_write`` (deepseek_v3, seeded; 64 KiB shards),
# taken from the code before the format objects existed: a refactor must not change a byte.
# A dependency upgrade (torch, safetensors) that changes them needs a reviewed re-pin.
GOLDEN = {
    "compressed-tensors": "e5222d4b63a7dfbfda30937a3efc2dd81c8e9b10c864a6bb17d632e7daf7fdbc",
    "compressed-tensors/no-clip": "26bf46ee4495136d819c15f6effc012e37f66bb5b4c13837c26759b9f85fdef3",
    "ascendv1": "ca71cbf1b0f6065fa2ca9e3b7d9cc9edbd5d5c9656b05b65524513a97d07741e",
}


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_written_bytes_are_pinned(tmp_path, case):
    fmt, _, variant = case.partition("/")
    kw = {"activation_use_clip": False} if variant == "no-clip" else {}
    assert _folder_digest(_write(tmp_path / "ckpt", fmt, **kw)) == GOLDEN[case]


# ---------------------------------------------------------------- the modelslim spelling
def test_modelslim_spelling_changes_only_quant_method(tmp_path):
    default = _write(tmp_path / "ct", "compressed-tensors")
    slim = _write(tmp_path / "slim", "compressed-tensors", quant_method="modelslim")
    a, b = _file_digests(default), _file_digests(slim)
    assert set(a) == set(b) and all(a[f] == b[f] for f in a if f != "config.json")
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (default, slim))
    assert ca["quantization_config"].pop("quant_method") == "compressed-tensors"
    assert cb["quantization_config"].pop("quant_method") == "modelslim"
    assert ca == cb


@pytest.mark.parametrize("quant_method", ["compressed-tensors", "modelslim"])
def test_both_spellings_round_trip(tmp_path, quant_method):
    path = _write(tmp_path / "ckpt", "compressed-tensors", quant_method=quant_method)
    ckpt = open_checkpoint(path)
    assert ckpt.format is COMPRESSED_TENSORS and ckpt.quant_method == quant_method
    assert ckpt.summary()["quant_method"] == quant_method and ckpt.activation_use_clip
    reference = open_checkpoint(_write(tmp_path / "ref", "compressed-tensors"))
    for layer in (1, 2):
        got, want = ckpt.load_moe_layer_tensors(layer), reference.load_moe_layer_tensors(layer)
        assert torch.equal(got.alpha, want.alpha)
        for p in EXPERT_PROJ:
            assert torch.equal(got.packed[p], want.packed[p]) and torch.equal(got.scale[p], want.scale[p])


def test_modelslim_output_has_what_sglang_057_reads(tmp_path):
    """The facts of UPSTREAM-COMPAT.md: sglang 0.5.7 takes the clip flag from
    ``config_groups.group_1.activation_use_clip``, detects W4 by the ``MoEGMM`` target, loads
    the bias tensors only under ``quant_method == "modelslim"``, and, with the clip flag,
    registers int64 ``[E, N, 1]`` scales (low 32 bits the fp32 bits), ``w13_bias [E, 2I]``,
    ``w2_bias [E, H]`` and ``w2_alpha [E]``."""
    path = _write(tmp_path / "ckpt", "compressed-tensors", quant_method="modelslim")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "modelslim"
    group = qc["config_groups"]["group_1"]
    assert group["activation_use_clip"] is True and group["targets"] == ["MoEGMM"]
    assert group["weights"]["num_bits"] == 4 and group["input_activations"]["num_bits"] == 8
    assert all("MoEGMM" not in g["targets"] for name, g in qc["config_groups"].items() if name != "group_1")
    ckpt = open_checkpoint(path)
    mc = ckpt.model_config
    e, h, i = mc.num_experts, mc.hidden_size, mc.moe_intermediate_size
    for layer in ckpt.moe_layers:
        w13_bias, w2_bias, w2_alpha = [], [], []
        for expert in range(e):
            base = f"model.layers.{layer}.mlp.experts.{expert}"
            w13_bias.append(torch.cat([ckpt.reader.get(f"{base}.{p}_proj.bias") for p in ("gate", "up")]))
            w2_bias.append(ckpt.reader.get(f"{base}.down_proj.bias"))
            w2_alpha.append(ckpt.reader.get(f"{base}.down_proj.alpha").reshape(()))
            for p, n in (("gate", i), ("up", i), ("down", h)):
                s = ckpt.reader.get(f"{base}.{p}_proj.weight_scale")
                assert s.dtype == torch.uint64 and tuple(s.shape) == (n, 1)
                as_int64 = s.view(torch.int64)  # what an int64 parameter receives
                assert bool((as_int64 >> 32 == 0).all())
                assert torch.equal((as_int64 & 0xFFFFFFFF).to(torch.int32).view(torch.float32), decode_scale_uint64(s))
        assert torch.stack(w13_bias).shape == (e, 2 * i) and torch.stack(w2_bias).shape == (e, h)
        alphas = torch.stack(w2_alpha)
        assert alphas.shape == (e,) and alphas.dtype == torch.float32
    assert torch.equal(alphas, ckpt.load_moe_layer_tensors(ckpt.moe_layers[-1]).alpha)


def test_convert_writes_either_spelling_and_refuses_it_for_ascendv1(tmp_path):
    from w4a8moe.cli import main as cli_main
    from w4a8moe.convert import convert
    from w4a8moe.convert.synthetic import make_hf_checkpoint

    src = make_hf_checkpoint(tiny_config("qwen3_moe"), tmp_path / "src", seed=0)
    args = ["--no-learn", "--quiet", "--threads", "1"]
    assert cli_main(["convert", str(src), str(tmp_path / "slim"), "--quant-method", "modelslim"] + args) == 0
    assert cli_main(["convert", str(src), str(tmp_path / "ct")] + args) == 0
    slim, ct = open_checkpoint(tmp_path / "slim"), open_checkpoint(tmp_path / "ct")
    assert slim.quant_method == "modelslim" and ct.quant_method == "compressed-tensors"
    a, b = _file_digests(tmp_path / "slim"), _file_digests(tmp_path / "ct")
    # The weights are the same bytes; only the configs (quant_method, settings hash) differ.
    assert {f: d for f, d in a.items() if f.endswith(".safetensors")} == {f: d for f, d in b.items() if f.endswith(".safetensors")}
    with pytest.raises(ConversionError, match="no quant_method"):
        convert(src, tmp_path / "av", fmt="ascendv1", learn=False, progress=False, quant_method="modelslim")
    assert not (tmp_path / "av").exists()  # refused before anything was written
    with pytest.raises(ConversionError, match="fmt must be one of"):
        convert(src, tmp_path / "x", fmt="gguf", learn=False, progress=False)


# ---------------------------------------------------------------- imports
def test_formats_never_import_compressed_tensors_or_transformers_until_needed(tmp_path):
    """``w4a8moe.formats`` (without the package's top level) loads neither heavy package, nor
    when writing and opening an AscendV1 checkpoint; a compressed-tensors one validates its
    scheme with the package, imported then."""
    src = Path(__file__).resolve().parents[1] / "src"
    script = textwrap.dedent(f"""
        import importlib.machinery, importlib.util, sys, types
        # Packages without running their __init__, so that only w4a8moe.formats (and what
        # it imports) is measured; models.synthetic only builds the random layers.
        for name, where in (("w4a8moe", {str(src)!r}), ("w4a8moe.models", {str(src / "w4a8moe")!r})):
            spec = importlib.machinery.PathFinder.find_spec(name.rpartition(".")[2], [where])
            pkg = types.ModuleType(name); pkg.__path__ = list(spec.submodule_search_locations)
            sys.modules[name] = pkg
        heavy = ("compressed_tensors", "transformers", "pydantic")
        def loaded(): return [m for m in heavy if m in sys.modules]
        import w4a8moe.formats as f
        from w4a8moe.models.synthetic import random_float_moe_layer, tiny_config
        assert loaded() == [], ("import", loaded())
        cfg = tiny_config()
        f.write_checkpoint({str(tmp_path / 'av')!r}, cfg, {{1: random_float_moe_layer(cfg)}}, "ascendv1")
        f.open_checkpoint({str(tmp_path / 'av')!r})
        assert loaded() == [], ("ascendv1", loaded())
        f.write_checkpoint({str(tmp_path / 'ct')!r}, cfg, {{1: random_float_moe_layer(cfg)}}, "compressed-tensors")
        assert "compressed_tensors" in sys.modules
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_inspect_names_a_non_default_spelling(tmp_path, capsys):
    from w4a8moe.cli import main as cli_main

    assert cli_main(["inspect", str(_write(tmp_path / "slim", "compressed-tensors", quant_method="modelslim"))]) == 0
    assert "compressed-tensors  (quant_method modelslim, model_type deepseek_v3)" in capsys.readouterr().out
    assert cli_main(["inspect", str(_write(tmp_path / "ct", "compressed-tensors"))]) == 0
    assert "compressed-tensors  (model_type deepseek_v3)" in capsys.readouterr().out
