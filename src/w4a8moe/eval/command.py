"""``w4a8moe eval SOURCE [CHECKPOINT ...]``: accuracy table, JSON and plot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from w4a8moe.data import load_user_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``w4a8moe eval``."""
    parser.add_argument("source", help="the source model: a Hugging Face checkpoint folder")
    parser.add_argument("checkpoints", nargs="*", help="W4A8 checkpoints to compare (either format)")
    parser.add_argument("--label", action="append", default=[], help="display name of each checkpoint, in order")
    parser.add_argument("--text", help="UTF-8 text file to evaluate on (default: the built-in held-out plays)")
    parser.add_argument("--seq-len", type=int, default=128,
                        help="tokens per window (default 128, the context the built-in test model was trained on)")
    parser.add_argument("--num-sequences", type=int, default=32,
                        help="windows to evaluate (default 32; 0 = every full window of the text)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-w8a8", action="store_true", help="skip the W8A8 (int8 experts) baseline")
    parser.add_argument("--no-rtn", action="store_true", help="skip the W4A8 round-to-nearest baseline")
    parser.add_argument("--rtn", help="an existing round-to-nearest W4A8 checkpoint to use as that baseline "
                        "(default: convert the source with learn=False)")
    parser.add_argument("--learned", action="store_true",
                        help="also convert the source with learned clips (into --work-dir) and evaluate that")
    parser.add_argument("--no-alpha-variants", action="store_true",
                        help="skip the apply_alpha=False rows of checkpoints with activation clips")
    parser.add_argument("--work-dir", help="where to write the RTN baseline checkpoint (default: a temporary folder)")
    parser.add_argument("--backend", help="expert kernel backend (default: $W4A8MOE_BACKEND or the fastest)")
    parser.add_argument("--device", default="cpu", help="where the models run: cpu (default), cuda, cuda:N")
    parser.add_argument("--json", default="w4a8moe_eval.json", help="JSON report path (default w4a8moe_eval.json)")
    parser.add_argument("--plot", default="w4a8moe_eval.png", help="PNG plot path (default w4a8moe_eval.png)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the table, write the JSON and the plot."""
    from w4a8moe.eval.run import evaluate, format_table, write_plot

    text = load_user_text(args.text) if args.text else None
    report = evaluate(
        args.source,
        args.checkpoints,
        labels=args.label,
        text=text,
        text_name=Path(args.text).name if args.text else "heldout",
        seq_len=args.seq_len,
        num_sequences=args.num_sequences or None,
        batch_size=args.batch_size,
        w8a8_baseline_model=not args.no_w8a8,
        rtn_baseline=not args.no_rtn,
        rtn_checkpoint=args.rtn,
        learned_baseline=args.learned,
        no_alpha_variants=not args.no_alpha_variants,
        work_dir=args.work_dir,
        backend=args.backend,
        device=args.device,
        progress=not args.quiet,
    )
    print(format_table(report))
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"report written to {args.json}")
    if not args.no_plot:
        print(write_plot(report, args.plot))
    return 0
