"""Start-up benchmark of the command line: wall time of ``w4a8moe inspect`` / ``verify`` as a user runs them.

    python bench/bench_cli_startup.py            # 7 runs of each command, ~2 MB checkpoints
    python bench/bench_cli_startup.py --quick    # 3 runs

Each figure is a whole process, start to exit (``python -m w4a8moe.cli ...``), median and
minimum of the runs, beside ``python -c "import torch"`` (the floor: the checkpoint code uses
torch) and ``python -c "import w4a8moe"``, measured in the same run, interleaved. Targets
(issue 9): inspect and verify of an AscendV1 checkpoint under 1.5 s on a quiet machine;
verify of compressed-tensors pays for the scheme validation (compressed-tensors imports
transformers) and nothing else.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 1.5


def _checkpoints(root: Path) -> dict[str, Path]:
    from w4a8moe import write_checkpoint
    from w4a8moe.models.synthetic import random_float_moe_layer, tiny_config

    # ~2 MB: 2 MoE layers of 16 experts, hidden 256, expert intermediate 128.
    cfg = tiny_config("deepseek_v3", hidden_size=256, n_routed_experts=16, moe_intermediate_size=128,
                      num_hidden_layers=3)
    layers = {layer: random_float_moe_layer(cfg, layer) for layer in (1, 2)}
    return {fmt: write_checkpoint(root / fmt, cfg, layers, fmt) for fmt in ("ascendv1", "compressed-tensors")}


def _wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 runs per command")
    parser.add_argument("--runs", type=int, default=None)
    args = parser.parse_args()
    runs = args.runs or (3 if args.quick else 7)
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = _checkpoints(Path(tmp))
        size = {f: sum(p.stat().st_size for p in d.iterdir()) for f, d in ckpts.items()}
        commands = {
            'python -c "import torch"': [py, "-c", "import torch"],
            'python -c "import w4a8moe"': [py, "-c", "import w4a8moe"],
            "w4a8moe inspect (AscendV1)": [py, "-m", "w4a8moe.cli", "inspect", str(ckpts["ascendv1"])],
            "w4a8moe verify (AscendV1)": [py, "-m", "w4a8moe.cli", "verify", str(ckpts["ascendv1"])],
            "w4a8moe inspect (compressed-tensors)": [py, "-m", "w4a8moe.cli", "inspect", str(ckpts["compressed-tensors"])],
            "w4a8moe verify (compressed-tensors)": [py, "-m", "w4a8moe.cli", "verify", str(ckpts["compressed-tensors"])],
        }
        for cmd in commands.values():  # warm-up: page cache, .pyc files
            _wall(cmd)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(runs):  # interleaved, so that drift of the machine hits every command alike
            for name, cmd in commands.items():
                times[name].append(_wall(cmd))
    print(f"checkpoints: AscendV1 {size['ascendv1'] / 1e6:.1f} MB, compressed-tensors "
          f"{size['compressed-tensors'] / 1e6:.1f} MB; {runs} runs each, wall seconds")
    print(f"{'command':40s} {'median':>8s} {'min':>8s}  target")
    for name, t in times.items():
        target = f"< {TARGET_S} s" if "AscendV1" in name else ""
        print(f"{name:40s} {statistics.median(t):8.2f} {min(t):8.2f}  {target}")


if __name__ == "__main__":
    main()
