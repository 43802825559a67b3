"""``w4a8moe inspect`` and ``w4a8moe verify``."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

from w4a8moe.errors import CheckpointError
from w4a8moe.formats.checkpoint import open_checkpoint


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**30 else f"{n / 2**20:.3f} MiB"


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _inspect_run(args: argparse.Namespace) -> int:
    ckpt = open_checkpoint(args.path, validate="structure")
    s = ckpt.summary()
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"checkpoint       {s['path']}")
    spelling = "" if ckpt.quant_method == ckpt.format.default_quant_method else f"quant_method {ckpt.quant_method}, "
    print(f"format           {s['format']}  ({spelling}model_type {s['model_type']})")
    print(f"activation clip  {'yes (per-expert alpha)' if s['activation_use_clip'] else 'no'}")
    print(f"MoE layers       {len(s['moe_layers'])}: {s['moe_layers']}")
    print(f"experts          {s['num_experts']} routed, top-{s['top_k']}, routing {s['routing']}, "
          f"shared intermediate {s['shared_intermediate_size']}")
    print(f"shapes           hidden {s['hidden_size']}, expert intermediate {s['moe_intermediate_size']}")
    print(f"tensors          {s['num_tensors']}, {_gib(s['checkpoint_bytes'])} on disk")
    w4, w8, bf = s["routed_expert_bytes_w4"], s["routed_expert_bytes_w8a8"], s["routed_expert_bytes_bf16"]
    print(f"routed experts   {s['routed_expert_params']:,} weights: W4A8 {_gib(w4)} | W8A8 {_gib(w8)} "
          f"({w8 / w4:.2f}x) | bf16 {_gib(bf)} ({bf / w4:.2f}x)")
    return 0


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint directory")


def _verify_run(args: argparse.Namespace) -> int:
    try:
        ckpt = open_checkpoint(args.path, validate="full")
    except CheckpointError as exc:
        print(f"FAILED: {exc}")
        return 1
    print(f"OK: {ckpt.path} is a sound {ckpt.format} checkpoint: {len(ckpt.moe_layers)} W4A8 MoE layers, "
          f"{ckpt.model_config.num_experts} experts each, {len(ckpt.reader.infos)} tensors checked, "
          f"activation clip {'on' if ckpt.activation_use_clip else 'off'}")
    return 0


inspect = SimpleNamespace(add_arguments=_inspect_args, run=_inspect_run)
verify = SimpleNamespace(add_arguments=_verify_args, run=_verify_run)
