"""The main demo (``make demo``): build, verify and run small W4A8 checkpoints end to end.

Builds a small DeepSeek-V3-shaped model's MoE layers with random weights (outlier columns
included), writes them in both W4A8 formats, validates each checkpoint, runs a forward
pass and prints a summary comparing the W4A8 layer with the float layer.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from w4a8moe.formats import ASCENDV1, COMPRESSED_TENSORS, open_checkpoint, write_checkpoint
from w4a8moe.models.synthetic import random_float_moe_layer, tiny_config


def float_moe_reference(layer, routing, x: torch.Tensor) -> torch.Tensor:
    """The unquantized MoE block in fp32, for the demo's error figure."""
    from w4a8moe.moe.routing import select_experts
    import torch.nn.functional as F

    xf = x.float()
    w, ids = select_experts(F.linear(xf, layer.router_weight.float()), routing, layer.correction_bias)
    out = torch.zeros_like(xf)
    for slot in range(ids.shape[1]):
        for e in ids[:, slot].unique().tolist():
            rows = ids[:, slot] == e
            g = xf[rows] @ layer.experts["gate"][e].T
            u = xf[rows] @ layer.experts["up"][e].T
            out[rows] += w[rows, slot, None] * ((F.silu(g) * u) @ layer.experts["down"][e].T)
    out *= routing.routed_scaling_factor
    if layer.shared is not None:
        s = layer.shared
        out += (F.silu(xf @ s["gate"].T) * (xf @ s["up"].T)) @ s["down"].T
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the demo; ``--out DIR`` keeps the checkpoints."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where to keep the checkpoints")
    args = parser.parse_args(argv)
    out_root = args.out or Path(tempfile.mkdtemp(prefix="w4a8moe-demo-"))
    config = tiny_config("deepseek_v3", hidden_size=256, moe_intermediate_size=128, n_routed_experts=16,
                         num_experts_per_tok=4)
    num_experts = config["n_routed_experts"]
    alphas = torch.linspace(0.7, 1.0, num_experts)
    layers = {i: random_float_moe_layer(config, seed=i, alpha=alphas) for i in (1, 2)}
    x = torch.randn(64, config["hidden_size"], generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    x[3] *= 20.0  # one outlier token
    print(f"w4a8moe demo: DeepSeek-V3-shaped MoE, {num_experts} experts, top-{config['num_experts_per_tok']}, "
          f"H={config['hidden_size']}, I={config['moe_intermediate_size']}; checkpoints under {out_root}\n")
    rows = []
    for fmt in (COMPRESSED_TENSORS, ASCENDV1):
        path = write_checkpoint(out_root / fmt, config, layers, fmt, max_shard_bytes=256 * 1024)
        ckpt = open_checkpoint(path)
        for layer_idx in ckpt.moe_layers:
            ref = float_moe_reference(layers[layer_idx], ckpt.model_config.routing, x)
            for apply_alpha in ((True, False) if ckpt.activation_use_clip else (True,)):
                y = ckpt.moe_layer(layer_idx, apply_alpha=apply_alpha)(x).float()
                rel = float((y - ref).norm() / ref.norm())
                rows.append((fmt, layer_idx, ckpt.activation_use_clip, apply_alpha, rel))
        s = ckpt.summary()
        print(f"{fmt:<19} verified: {s['num_tensors']} tensors, {len(ckpt.reader.infos)} checked, "
              f"routed experts {s['routed_expert_bytes_w4']/1024:.0f} KiB (W8A8 would be "
              f"{s['routed_expert_bytes_w8a8']/1024:.0f} KiB, bf16 {s['routed_expert_bytes_bf16']/1024:.0f} KiB)")
    print("\nforward pass of 64 tokens (one outlier token), relative L2 error vs the float layer:")
    print(f"{'format':<19} {'layer':>5} {'clip':>5} {'alpha':>6} {'rel. error':>11}")
    for fmt, layer_idx, clip, apply_alpha, rel in rows:
        print(f"{fmt:<19} {layer_idx:>5} {str(clip):>5} {('on' if apply_alpha else 'off'):>6} {rel:>11.4f}")
    print("\n(alpha values here are arbitrary, not learned: the converter learns them from calibration text)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
