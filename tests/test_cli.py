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


# ---------------------------------------------------------------- import graph (fast CLI)
# Seconds of import each; `import w4a8moe` and inspect/verify of AscendV1 must load none.
HEAVY = ("transformers", "compressed_tensors", "w4a8moe.convert", "w4a8moe.models", "w4a8moe.eval",
         "w4a8moe.calibrate")
_LOADED = "import json, sys; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {'transformers', 'compressed_tensors', 'w4a8moe'})))"


def _heavy(modules: list[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


def _run_python(code: str) -> list[list[str]]:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("[")]


def test_import_w4a8moe_loads_nothing_heavy_and_names_resolve():
    before, after = _run_python(
        "import w4a8moe\n" + _LOADED + "\n"
        "import w4a8moe.convert.progress  # binds the subpackage name; w4a8moe.convert stays the function\n"
        "assert callable(w4a8moe.convert) and w4a8moe.convert.__module__ == 'w4a8moe.convert.pipeline'\n"
        "from w4a8moe import *\n"
        "for name in w4a8moe.__all__: assert getattr(w4a8moe, name) is not None, name\n"
        "from w4a8moe.convert import convert, SourceCheckpoint\n"
        "from w4a8moe.models import load_model, tiny_config\n"
        "from w4a8moe.eval import evaluate, perplexity\n"
        "assert convert is w4a8moe.convert\n" + _LOADED
    )
    assert _heavy(before) == [], _heavy(before)
    assert "w4a8moe.convert.pipeline" in after  # the names did resolve, by importing their modules


def test_inspect_and_verify_of_ascendv1_load_nothing_heavy(tmp_path):
    ascend, ct = _checkpoint(tmp_path, "ascendv1"), _checkpoint(tmp_path)
    quiet = "import contextlib, io\nfrom w4a8moe.cli import main\n"
    run = "with contextlib.redirect_stdout(io.StringIO()): assert main({!r}) == 0\n"
    ascend_only, with_ct = _run_python(
        quiet + run.format(["inspect", str(ascend)]) + run.format(["verify", str(ascend)]) + _LOADED + "\n"
        + run.format(["verify", str(ct)]) + _LOADED
    )
    assert _heavy(ascend_only) == [], _heavy(ascend_only)
    # compressed-tensors: the scheme validation needs its package (and so transformers), no more
    assert "compressed_tensors" in with_ct
    assert [m for m in _heavy(with_ct) if m.startswith("w4a8moe.")] == []
