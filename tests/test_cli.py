"""The ``w4a8moe`` command: inspect and verify."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

from w4a8moe import write_checkpoint
from w4a8moe.cli import main
from w4a8moe.models.synthetic import random_float_moe_layer, tiny_config


def _checkpoint(tmp_path, fmt="compressed-tensors"):
    cfg = tiny_config("deepseek_v3")
    return write_checkpoint(tmp_path / fmt, cfg, {1: random_float_moe_layer(cfg, 1)}, fmt)


def test_inspect_human_and_json(tmp_path, capsys):
    path = _checkpoint(tmp_path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "compressed-tensors" in out and "activation clip  yes" in out and "W8A8" in out
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["moe_layers"] == [1] and data["format"] == "compressed-tensors"


def test_verify_ok_and_failure(tmp_path, capsys):
    path = _checkpoint(tmp_path, "ascendv1")
    assert main(["verify", str(path)]) == 0
    assert "OK" in capsys.readouterr().out
    shard = next(path.glob("*.safetensors"))
    tensors = load_file(shard)
    name = "model.layers.1.mlp.experts.0.gate_proj.weight_scale"
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, shard)
    assert main(["verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and name in out


def test_inspect_error_exit_code(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "config.json is missing" in capsys.readouterr().err


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "w4a8moe.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "verify" in result.stdout
