"""The trained test subject: a few training steps give a sound, convertible, loadable checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from w4a8moe.models import load_model, trained
from w4a8moe.models.trained import TRAIN_REPORT_FILE, tiny_trained_config, train_tiny_model

FAST = dict(steps=6, batch_size=4, seq_len=32, verbose=False)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    return train_tiny_model(tmp_path_factory.mktemp("trained") / "m", **FAST)


def test_saved_layout_dtypes_and_report(trained_dir):
    config = json.loads((trained_dir / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["vocab_size"] == 256
    with safe_open(trained_dir / "model.safetensors", "pt") as f:
        names = set(f.keys())
        for layer in (1, 2, 3):
            for expert in range(config["n_routed_experts"]):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    assert f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight" in names
            assert f.get_tensor(f"model.layers.{layer}.mlp.experts.0.gate_proj.weight").dtype == torch.bfloat16
            bias = f.get_tensor(f"model.layers.{layer}.mlp.gate.e_score_correction_bias")
            assert bias.dtype == torch.float32
            assert bool((bias != 0).any())  # moved by the aux-loss-free balancing
        assert not any("gate_up_proj" in n for n in names)
        assert "model.layers.0.mlp.gate_proj.weight" in names  # first layer dense
    report = json.loads((trained_dir / TRAIN_REPORT_FILE).read_text())
    assert report["steps"] == 6 and report["num_parameters"] > 1_000_000
    # six steps already beat a uniform guess over 256 bytes
    assert report["heldout_loss_fp32"] < math.log(256) - 0.5


def test_byte_tokenizer_files_round_trip(trained_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained_dir)
    text = "O Romeo, Romeo! wherefore art thou Romeo?\n  é ß 😀"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.eos_token_id == 0 and len(tok) == 256


def test_training_is_deterministic(tmp_path, trained_dir):
    again = train_tiny_model(tmp_path / "again", **FAST)
    with safe_open(trained_dir / "model.safetensors", "pt") as a, safe_open(again / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for name in a.keys():
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name


def test_converts_and_loads(tmp_path, trained_dir):
    from w4a8moe.convert import convert
    from w4a8moe.eval.run import load_source_model

    convert(trained_dir, tmp_path / "q", learn=False, progress=False)
    model = load_model(tmp_path / "q")
    source = load_source_model(trained_dir)
    ids = torch.tensor([list(b"To be, or not to be")])
    with torch.no_grad():
        q, s = model(input_ids=ids).logits.float(), source(input_ids=ids).logits.float()
    # quantized but close: most next-byte predictions agree
    assert (q.argmax(-1) == s.argmax(-1)).float().mean() >= 0.8
    assert not torch.equal(q, s)


def test_cache_dir_trains_once_atomically(tmp_path, monkeypatch):
    calls = []
    real = trained.train_tiny_model

    def fast(out_dir, verbose=True):
        calls.append(out_dir)
        assert out_dir.parent == tmp_path and out_dir.name.startswith(".")  # a temporary sibling
        return real(out_dir, **FAST)

    monkeypatch.setattr(trained, "train_tiny_model", fast)
    monkeypatch.setenv(trained.CACHE_ENV, str(tmp_path))
    first = trained.tiny_trained_model_dir(verbose=False)
    assert first == tmp_path / trained.TINY_MODEL_NAME
    assert (first / TRAIN_REPORT_FILE).exists() and (first / "model.safetensors").exists()
    assert trained.tiny_trained_model_dir(verbose=False) == first
    assert len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [trained.TINY_MODEL_NAME]  # no temp dirs left


def test_config_is_valid_noaux_tc():
    from w4a8moe.formats import MoEModelConfig

    mc = MoEModelConfig.from_dict(tiny_trained_config())
    assert mc.routing.method == "noaux_tc" and mc.routing.n_group == 4 and mc.routing.topk_group == 2
    assert mc.expected_moe_layers == (1, 2, 3)
    assert mc.moe_intermediate_size % 16 == 0 and mc.shared_intermediate_size == mc.moe_intermediate_size
