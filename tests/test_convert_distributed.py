"""The clip search split across processes (``torchrun``-style, gloo on the CPU): the output
must be byte-identical to one process's, and a worker's failure must surface on rank 0."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from w4a8moe.convert import convert
from w4a8moe.convert.synthetic import make_hf_checkpoint
from w4a8moe.errors import ConversionError
from w4a8moe.models import tiny_config

CALIB = dict(calib_sequences=4, calib_seq_len=48, num_threads=1, progress=False, max_shard_bytes=60_000)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, src: str, dst: str, results: str) -> None:
    # What torchrun sets for each process.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        report = convert(src, dst, **CALIB)
        outcome = "report" if report else "worker"
    except ConversionError as exc:
        outcome = f"ConversionError: {exc}"
    Path(results, f"rank{rank}").write_text(outcome)


def _launch(world: int, src: Path, dst: Path, tmp_path: Path) -> dict[int, str]:
    results = tmp_path / f"results-{dst.name}"
    results.mkdir()
    mp.start_processes(_rank_main, args=(world, _free_port(), str(src), str(dst), str(results)), nprocs=world,
                       join=True, start_method="spawn")
    return {r: (results / f"rank{r}").read_text() for r in range(world)}


def _dir_bytes(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_hf_checkpoint(tiny_config("deepseek_v3"), tmp_path_factory.mktemp("src") / "src", seed=3,
                              outliers=True)


def test_two_processes_write_the_bytes_of_one(source, tmp_path):
    one = tmp_path / "one"
    report = convert(source, one, **CALIB)
    assert any(e["status"] == "learned" for e in report["units"]["layer_1"]["moe"]["per_expert"])
    outcomes = _launch(2, source, tmp_path / "two", tmp_path)
    assert outcomes == {0: "report", 1: "worker"}
    assert _dir_bytes(tmp_path / "two") == _dir_bytes(one)


def test_a_worker_failure_is_raised_on_rank_0(source, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in source.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    # Expert 1 of layer 1 is rank 1's (experts e with e % 2 == 1): give it a NaN.
    name = "model.layers.1.mlp.experts.1.down_proj.weight"
    for shard in bad.glob("*.safetensors"):
        tensors = load_file(shard)
        if name in tensors:
            tensors[name][0, 0] = float("nan")
            save_file(tensors, shard, metadata={"format": "pt"})
    outcomes = _launch(2, bad, tmp_path / "dst", tmp_path)
    assert outcomes[1] == "worker"
    assert outcomes[0].startswith("ConversionError") and "rank 1" in outcomes[0] and "NaN" in outcomes[0]


def test_device_must_exist():
    with pytest.raises(ConversionError, match="device"):
        convert("unused-src", "unused-dst", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConversionError, match="not available"):
            convert("unused-src", "unused-dst", device="cuda")
