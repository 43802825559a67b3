"""``w4a8moe generate``: streaming text from a W4A8 checkpoint, with or without tokenizer files."""

from __future__ import annotations

import io
import shutil

import pytest
import torch

from tests.conftest import random_hf_model
from w4a8moe.models.command import ByteStreamer, generate_text


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from w4a8moe.models.export import export_w4a8_checkpoint
    from w4a8moe.models.trained import write_byte_tokenizer

    model, cfg = random_hf_model()
    root = tmp_path_factory.mktemp("gen")
    export_w4a8_checkpoint(model, cfg, root / "bytes")  # no tokenizer files: byte fallback
    shutil.copytree(root / "bytes", root / "hf")
    write_byte_tokenizer(root / "hf")
    return root


def test_byte_streamer_holds_back_partial_characters():
    out = io.StringIO()
    streamer = ByteStreamer(out)
    streamer.put(torch.tensor([[72, 105]]))  # the prompt: skipped
    data = "é😀".encode()
    for b in data:
        streamer.put(torch.tensor([b]))
        if b == data[0]:
            assert out.getvalue() == ""  # first byte of 'é' alone prints nothing
    streamer.end()
    assert out.getvalue() == "é😀\n"


def test_greedy_generation_same_with_either_tokenizer(checkpoint, capsys):
    a = generate_text(checkpoint / "bytes", "To be", max_new_tokens=12)
    streamed = capsys.readouterr().out
    b = generate_text(checkpoint / "hf", "To be", max_new_tokens=12, stream=False)
    assert a == b and len(a.encode("utf-8", errors="replace")) >= 1
    assert streamed.rstrip("\n") == a


def test_generate_command_streams(checkpoint, capsys):
    from w4a8moe.cli import main

    assert main(["generate", str(checkpoint / "hf"), "--prompt", "Hark", "--max-new-tokens", "8",
                 "--temperature", "0.8", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Hark") and len(out) > len("Hark")


def test_no_tokenizer_and_large_vocab_is_an_error(tmp_path, checkpoint):
    import json

    from w4a8moe.errors import ConfigError
    from w4a8moe.models.tokenizer import load_tokenizer

    shutil.copytree(checkpoint / "bytes", tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    config["vocab_size"] = 1000
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="vocab_size=1000"):
        load_tokenizer(tmp_path / "c")
