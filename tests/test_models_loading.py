"""Whole-model loading: W4A8 checkpoints of every family against an independent fake-quant.

The reference here is written in plain torch from SPEC sections 1-3, without the package's
quant, moe or kernels code: the source model with each MoE block replaced by a block that
routes in fp32, uses dequantized int4 expert weights (``q * s``), quantize-dequantizes
activations per token (int8), rounds each expert matmul output to bf16 and clips the down
projection input with ``alpha``; Linears the checkpoint holds as W8A8 are replaced by
dequantized int8 weights with per-token int8 activations.

Tolerance: the reference sums dequantized fp32 products, the package sums exact integers and
scales afterwards. The two agree to ~1e-6 relative before each bf16 / int8 rounding, so they
differ only where such a tiny difference flips a rounding (one bf16 ulp = 2^-8 relative, or
one int8 step = 1/127 of a row maximum). Flips are rare and local, so the logits agree to a
small fraction of their scale: we require ``max |loaded - reference| <= 2e-2 * max |logits|``
and, so that the comparison has teeth, that this is under a fifth of the quantization error
itself (``|source - reference|``) and that the W4A8 error is orders above an exact match.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from tests.conftest import random_hf_model
from w4a8moe.errors import CheckpointError
from w4a8moe.models import W4A8MoEBlock, export_w4a8_checkpoint, load_model, tiny_config
from w4a8moe.models.loading import build_empty_model

FAMILIES = ("deepseek_v3", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe")


# ------------------------------------------------------------------ independent reference
def _qdq_rows(x: torch.Tensor, bound: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric int8 quantize-dequantize per row (SPEC 1), optionally against a clip bound."""
    x = x.float()
    if bound is None:
        bound = x.abs().amax(-1, keepdim=True)
    else:
        x = torch.maximum(torch.minimum(x, bound), -bound)
    scale = bound / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(x / safe), -128, 127) * scale


def _dq_weight(w: torch.Tensor, qmax: int, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Per-output-channel symmetric quantize-dequantize of ``[..., N, K]`` (SPEC 1)."""
    w = w.float()
    amax = w.abs().amax(-1)
    if clip is not None:
        amax = amax * clip
    s = amax / qmax
    s = torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(-1)
    return torch.clamp(torch.round(w / s), -qmax, qmax) * s


class RefLinearW8A8(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.w = _dq_weight(linear.weight.detach(), 127)
        self.b = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)

    def forward(self, x):
        y = (_qdq_rows(x.reshape(-1, x.shape[-1])) @ self.w.T).to(torch.bfloat16).reshape(*x.shape[:-1], -1)
        return y if self.b is None else y + self.b


def _silu_mul_rounded_once(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """SPEC 1: a gated MLP's activation in fp32 from the bf16 projections, rounded once to bf16."""
    return (F.silu(g.float()) * u.float()).to(torch.bfloat16)


class RefGatedMLP(nn.Module):
    """A transformers dense MLP with W8A8 projections, its activation rounded once (SPEC 1)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (RefLinearW8A8(getattr(mlp, n))
                                                        for n in ("gate_proj", "up_proj", "down_proj"))

    def forward(self, x):
        return self.down_proj(_silu_mul_rounded_once(self.gate_proj(x), self.up_proj(x)))


class RefMoE(nn.Module):
    """A transformers MoE block, fake-quantized as SPEC 1-3 describe."""

    def __init__(self, block: nn.Module, cfg: dict, alpha: torch.Tensor | None, wclip: dict | None, shared_w8a8: bool):
        super().__init__()
        self.cfg = cfg
        inter = block.experts.gate_up_proj.shape[1] // 2
        gu = block.experts.gate_up_proj.detach().float()
        clip = wclip or {}
        self.wg = _dq_weight(gu[:, :inter], 7, clip.get("gate"))
        self.wu = _dq_weight(gu[:, inter:], 7, clip.get("up"))
        self.wd = _dq_weight(block.experts.down_proj.detach().float(), 7, clip.get("down"))
        self.router = block.gate.weight.detach().float()
        self.bias = getattr(block.gate, "e_score_correction_bias", None)
        self.alpha = alpha if alpha is not None else torch.ones(self.wg.shape[0])
        shared = getattr(block, "shared_experts", None) or getattr(block, "shared_expert", None)
        self.shared = None
        if shared is not None:
            make = RefLinearW8A8 if shared_w8a8 else (lambda lin: lin)
            self.shared = nn.ModuleList([make(shared.gate_proj), make(shared.up_proj), make(shared.down_proj)])
        gate = getattr(block, "shared_expert_gate", None)
        self.shared_gate = None if gate is None else gate.weight.detach()

    def route(self, x):
        c = self.cfg
        logits = x.float() @ self.router.T
        k = c["num_experts_per_tok"]
        if c["model_type"] == "deepseek_v3":
            s = torch.sigmoid(logits)
            sb = s + self.bias.float()
            m, e = sb.shape
            g = sb.view(m, c["n_group"], -1)
            group_score = g.topk(2, -1).values.sum(-1)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(c["topk_group"], -1).indices, True)
            mask = keep.unsqueeze(-1).expand_as(g).reshape(m, e)
            ids = sb.masked_fill(~mask, float("-inf")).topk(k, -1).indices
            w = s.gather(1, ids)
            norm = c.get("norm_topk_prob", True)
            scale = c.get("routed_scaling_factor", 1.0)
        else:
            p = torch.softmax(logits, -1)
            w, ids = p.topk(k, -1)
            norm = c.get("norm_topk_prob", c["model_type"] in ("qwen3_moe", "mixtral"))
            scale = 1.0
        if norm:
            w = w / w.sum(-1, keepdim=True)
        return w, ids, scale

    def forward(self, h):
        shape = h.shape
        x = h.reshape(-1, shape[-1]).to(torch.bfloat16)
        w, ids, scale = self.route(x)
        xq = _qdq_rows(x)
        out = torch.zeros(x.shape[0], x.shape[1])
        for j in range(ids.shape[1]):
            for e in ids[:, j].unique().tolist():
                rows = (ids[:, j] == e).nonzero().squeeze(1)
                g = (xq[rows] @ self.wg[e].T).to(torch.bfloat16).float()
                u = (xq[rows] @ self.wu[e].T).to(torch.bfloat16).float()
                act = F.silu(g) * u
                bound = float(self.alpha[e]) * act.abs().amax(-1, keepdim=True)
                y = (_qdq_rows(act, bound) @ self.wd[e].T).to(torch.bfloat16).float()
                out[rows] += w[rows, j : j + 1] * y
        out = scale * out
        if self.shared is not None:
            gp, up, dp = self.shared
            sh = dp(_silu_mul_rounded_once(gp(x), up(x)))
            if self.shared_gate is not None:
                sh = torch.sigmoid(F.linear(x, self.shared_gate.to(x.dtype))) * sh
            out = out + sh.float()
        return out.to(torch.bfloat16).reshape(shape)


def reference_model(source: nn.Module, cfg: dict, w8a8: bool, alpha=None, wclip=None) -> nn.Module:
    """The source model fake-quantized by the plain-torch reference above."""
    ref = copy.deepcopy(source)
    for i, layer in enumerate(ref.model.layers):
        mlp = layer.mlp
        if hasattr(mlp, "experts") and hasattr(mlp, "gate"):
            layer.mlp = RefMoE(mlp, cfg, None if alpha is None else alpha[i], None if wclip is None else wclip[i], w8a8)
        elif w8a8:
            layer.mlp = RefGatedMLP(mlp)
        if w8a8:
            attn = layer.self_attn
            for name, mod in list(attn.named_children()):
                if isinstance(mod, nn.Linear) and name not in ("q_a_proj", "kv_a_proj_with_mqa", "kv_b_proj"):
                    setattr(attn, name, RefLinearW8A8(mod))
    return ref.eval()


# ------------------------------------------------------------------ helpers
def make_source(model_type: str, seed: int = 0, **overrides) -> tuple[nn.Module, dict]:
    """A random bf16 transformers model of ``model_type`` with weights large enough to matter,
    router values representable in bf16 and a non-zero correction bias."""
    model, cfg = random_hf_model(model_type, seed, **overrides)
    model.eval()
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.normal_(0, 0.05)
            if gate is not None:
                # the checkpoint stores the router in bf16; keep the source's values representable
                gate.weight.copy_(gate.weight.to(torch.bfloat16).float())
    return model, cfg


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _rewrite(directory: Path, mutate) -> None:
    """Apply ``mutate(dict name -> tensor)`` to a single-shard checkpoint, keeping its index right."""
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    (shard,) = sorted(set(index["weight_map"].values()))
    tensors = load_file(directory / shard)
    mutate(tensors)
    save_file(tensors, directory / shard)
    index["weight_map"] = {name: shard for name in tensors}
    index_path.write_text(json.dumps(index))


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("fmt", ["compressed-tensors", "ascendv1"])
def test_loaded_model_matches_fake_quant(tmp_path, model_type, fmt):
    source, cfg = make_source(model_type)
    export_w4a8_checkpoint(source, cfg, tmp_path / "q", fmt=fmt)
    model = load_model(tmp_path / "q")
    blocks = [m for m in model.modules() if isinstance(m, W4A8MoEBlock)]
    assert len(blocks) == len([l for l in source.model.layers if hasattr(l.mlp, "experts")])
    got = _logits(model, IDS)
    ref = _logits(reference_model(source, cfg, w8a8=True), IDS)
    src = _logits(source, IDS)
    scale = ref.abs().max()
    mismatch = (got - ref).abs().max()
    quant_error = (src - ref).abs().max()
    assert mismatch <= 2e-2 * scale, (mismatch, scale)
    assert mismatch <= 0.2 * quant_error, (mismatch, quant_error)
    assert quant_error > 1e-3 * scale  # the reference is really quantized


def test_activation_and_weight_clips_and_apply_alpha_false(tmp_path):
    source, cfg = make_source("deepseek_v3")
    gen = torch.Generator().manual_seed(3)
    moe_layers = [i for i, l in enumerate(source.model.layers) if hasattr(l.mlp, "experts")]
    e, inter, hidden = 8, cfg["moe_intermediate_size"], cfg["hidden_size"]
    alpha = {i: 0.4 + 0.6 * torch.rand(e, generator=gen) for i in moe_layers}
    wclip = {i: {p: 0.7 + 0.3 * torch.rand(e, n, generator=gen) for p, n in (("gate", inter), ("up", inter), ("down", hidden))}
             for i in moe_layers}
    export_w4a8_checkpoint(source, cfg, tmp_path / "q", alpha=alpha, weight_clip=wclip)
    got = _logits(load_model(tmp_path / "q"), IDS)
    ref = _logits(reference_model(source, cfg, True, alpha, wclip), IDS)
    ref_no_alpha = _logits(reference_model(source, cfg, True, None, wclip), IDS)
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= 2e-2 * scale
    assert (got - ref).abs().max() <= 0.2 * (ref - ref_no_alpha).abs().max()  # the clip matters here
    got_no_alpha = _logits(load_model(tmp_path / "q", apply_alpha=False), IDS)
    assert (got_no_alpha - ref_no_alpha).abs().max() <= 2e-2 * scale


def test_all_bf16_linears_and_generate(tmp_path):
    source, cfg = make_source("qwen3_moe")
    export_w4a8_checkpoint(source, cfg, tmp_path / "q", w8a8_policy=None)
    model = load_model(tmp_path / "q")
    assert not any(type(m).__name__.startswith("W8A8") for m in model.modules())
    got = _logits(model, IDS)
    ref = _logits(reference_model(source, cfg, w8a8=False), IDS)
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()
    out = model.generate(IDS[:1, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)


def test_meta_build_materialises_nothing():
    model = build_empty_model(tiny_config("deepseek_v3"))
    assert all(p.is_meta for p in model.parameters())


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    source, cfg = make_source("deepseek_v3")
    path = tmp_path_factory.mktemp("ckpt") / "q"
    export_w4a8_checkpoint(source, cfg, path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_float_tensor_is_named(tmp_path, small_checkpoint):
    d = _copy(small_checkpoint, tmp_path / "c")
    _rewrite(d, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: model\.norm\.weight"):
        load_model(d)


def test_missing_w8a8_scale_is_named(tmp_path, small_checkpoint):
    d = _copy(small_checkpoint, tmp_path / "c")
    _rewrite(d, lambda t: t.pop("model.layers.0.self_attn.o_proj.weight_scale"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight_scale"):
        load_model(d)


def test_unused_tensor_is_named(tmp_path, small_checkpoint):
    d = _copy(small_checkpoint, tmp_path / "c")
    _rewrite(d, lambda t: t.__setitem__("model.layers.0.self_attn.extra.weight", torch.zeros(2, 2, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError, match=r"not used .*model\.layers\.0\.self_attn\.extra\.weight"):
        load_model(d)


def test_int8_weight_without_linear_is_named(tmp_path, small_checkpoint):
    d = _copy(small_checkpoint, tmp_path / "c")

    def add(t):
        t["model.layers.0.self_attn.bogus.weight"] = torch.zeros(4, 4, dtype=torch.int8)
        t["model.layers.0.self_attn.bogus.weight_scale"] = torch.ones(4, 1)

    _rewrite(d, add)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.bogus"):
        load_model(d)


def test_wrong_shape_is_named(tmp_path, small_checkpoint):
    d = _copy(small_checkpoint, tmp_path / "c")
    _rewrite(d, lambda t: t.__setitem__("model.norm.weight", torch.ones(7, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*\[7\]"):
        load_model(d)


def test_config_and_checkpoint_disagree_on_moe_layers(tmp_path, small_checkpoint):
    d = _copy(small_checkpoint, tmp_path / "c")
    config = json.loads((d / "config.json").read_text())
    config["first_k_dense_replace"] = 0  # now layer 0 should be MoE as well
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"layers \[0, 1, 2\] MoE.*\[1, 2\]"):
        load_model(d)


def test_tied_embeddings(tmp_path):
    source, cfg = make_source("qwen3_moe", tie_word_embeddings=True)
    export_w4a8_checkpoint(source, cfg, tmp_path / "q")
    model = load_model(tmp_path / "q")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = _logits(reference_model(source, cfg, w8a8=True), IDS)
    assert (_logits(model, IDS) - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_deepseek_mtp_layer_is_skipped_only_when_declared(tmp_path, small_checkpoint):
    d = _copy(small_checkpoint, tmp_path / "c")

    def add_mtp(t):  # a layer past num_hidden_layers, as DeepSeek ships its multi-token-prediction layer
        t["model.layers.3.enorm.weight"] = torch.ones(64, dtype=torch.bfloat16)
        t["model.layers.3.self_attn.o_proj.weight"] = torch.ones(64, 64, dtype=torch.int8)
        t["model.layers.3.self_attn.o_proj.weight_scale"] = torch.ones(64, 1)

    _rewrite(d, add_mtp)
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\."):
        load_model(d)
    config = json.loads((d / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (d / "config.json").write_text(json.dumps(config))
    assert load_model(d)(input_ids=IDS).logits.shape == (2, 12, 256)
