"""The main demo (``make demo``): a trained MoE model quantized to W4A8, verified, run and measured.

1. Train (first run only, a few CPU minutes; then cached) or load the tiny DeepSeek-V3 test
   model: 4 layers, 16 routed experts with ``noaux_tc`` routing, a shared expert, MLA, bytes
   as tokens, trained on Shakespeare.
2. Convert it to W4A8: compressed-tensors with learned weight and activation clips,
   AscendV1 (learned weight clips; the format has no activation clip), and round-to-nearest.
3. Verify every checkpoint (all tensors, scales, int4 ranges, kernel biases, clips).
4. Generate a few lines with the learned-clip checkpoint.
5. Print the accuracy table on held-out plays (never seen in training or calibration):
   bf16 source, W8A8 (int8 experts), W4A8 RTN, W4A8 learned, and learned with
   ``apply_alpha=False`` (what upstream sglang computes).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from w4a8moe.convert import convert
from w4a8moe.eval.run import evaluate, format_table, write_plot
from w4a8moe.formats import ASCENDV1, COMPRESSED_TENSORS, open_checkpoint
from w4a8moe.models import load_model, tiny_trained_model_dir
from w4a8moe.models.command import generate_text
from w4a8moe.models.trained import TRAIN_REPORT_FILE

PROMPTS = ("ROMEO:\n", "Enter KING HENRY.\n\n**KING HENRY**  \n")


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    """Run the demo; ``--out DIR`` keeps the checkpoints and reports."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where to keep checkpoints, report and plot")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the trained model is cached (default: $W4A8MOE_CACHE_DIR or ~/.cache/w4a8moe)")
    parser.add_argument("--num-sequences", type=int, default=64, help="held-out windows of 128 bytes to evaluate")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    args = parser.parse_args(argv)
    out_root = args.out or Path(tempfile.mkdtemp(prefix="w4a8moe-demo-"))
    out_root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    t = _step("1. the test model")
    source = tiny_trained_model_dir(args.cache_dir)
    info = json.loads((source / TRAIN_REPORT_FILE).read_text())
    config = json.loads((source / "config.json").read_text())
    print(f"{source}\n  DeepSeek-V3 architecture, {info['num_parameters'] / 1e6:.2f}M parameters: "
          f"{config['num_hidden_layers']} layers ({config['first_k_dense_replace']} dense), "
          f"{config['n_routed_experts']} routed experts top-{config['num_experts_per_tok']} "
          f"({config['n_group']} groups, best {config['topk_group']}), {config['n_shared_experts']} shared expert, "
          f"hidden {config['hidden_size']}, expert width {config['moe_intermediate_size']}\n"
          f"  trained {info['steps']} steps ({info['train_tokens'] / 1e6:.1f}M bytes of Shakespeare) in "
          f"{info['train_seconds']:.0f}s: train loss {info['train_loss_fp32']:.3f}, held-out loss "
          f"{info['heldout_loss_fp32']:.3f} nats/byte  [{time.perf_counter() - t:.0f}s]")

    t = _step("2. convert to W4A8")
    targets = {
        "learned": (COMPRESSED_TENSORS, True),
        "ascendv1-learned": (ASCENDV1, True),
        "rtn": (COMPRESSED_TENSORS, False),
    }
    for name, (fmt, learn) in targets.items():
        t0 = time.perf_counter()
        convert(source, out_root / name, fmt=fmt, learn=learn, progress=False)
        kind = "learned clips" if learn else "round-to-nearest"
        print(f"  {name:<17} {fmt.name:<19} {kind:<17} {time.perf_counter() - t0:5.1f}s")
    print(f"  [{time.perf_counter() - t:.0f}s]")

    t = _step("3. verify")
    for name in targets:
        summary = open_checkpoint(out_root / name).summary()
        print(f"  {name:<17} sound: {summary['num_tensors']} tensors, activation clip "
              f"{'stored' if summary['activation_use_clip'] else 'absent'}, routed experts "
              f"{summary['routed_expert_bytes_w4'] / 1024:.0f} KiB (W8A8 {summary['routed_expert_bytes_w8a8'] / 1024:.0f} KiB, "
              f"bf16 {summary['routed_expert_bytes_bf16'] / 1024:.0f} KiB)")
    print(f"  [{time.perf_counter() - t:.0f}s]")

    t = _step("4. generate with the learned W4A8 checkpoint (sampling, temperature 0.7, seeded)")
    model = load_model(out_root / "learned")
    for i, prompt in enumerate(PROMPTS):
        print("-" * 60)
        print(prompt, end="", flush=True)
        generate_text(out_root / "learned", prompt, args.max_new_tokens, temperature=0.7, seed=i, model=model)
    print("-" * 60)
    print(f"  [{time.perf_counter() - t:.0f}s]")

    t = _step("5. accuracy on held-out plays (Macbeth, Twelfth Night, Richard II)")
    report = evaluate(
        source, [out_root / "learned", out_root / "ascendv1-learned"],
        labels=["W4A8 learned clips", "W4A8 AscendV1 (weight clip only)"],
        num_sequences=args.num_sequences, rtn_checkpoint=out_root / "rtn", progress=False,
    )
    print(format_table(report))
    (out_root / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"  report: {out_root / 'eval.json'}; {write_plot(report, out_root / 'eval.png')}")
    print(f"  [{time.perf_counter() - t:.0f}s]")
    print(f"\ndone in {time.perf_counter() - started:.0f}s; checkpoints under {out_root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
