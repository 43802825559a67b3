"""``w4a8moe convert SRC DST``: argument parsing over :func:`w4a8moe.convert.convert`."""

from __future__ import annotations

import argparse

from w4a8moe.calibrate import DEFAULT_MIN_EXPERT_TOKENS, ClipSearchSettings
from w4a8moe.calibrate.clips import REFINE_FORMS
from w4a8moe.convert.pipeline import DEFAULT_CALIB_SEQ_LEN, DEFAULT_CALIB_SEQUENCES, REPORT_FILE, convert
from w4a8moe.convert.policy import DEFAULT_KEEP_BF16
from w4a8moe.formats.compressed_tensors import COMPRESSED_TENSORS
from w4a8moe.formats.registry import FORMATS


def _size(text: str) -> int:
    """``4GB``, ``500MB``, ``64KiB`` or a plain byte count."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    t = text.strip().lower()
    for suffix, mult in units.items():
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(t)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``convert`` subcommand's arguments."""
    p.add_argument("src", help="Hugging Face checkpoint folder (bf16/fp16/fp32 or DeepSeek block FP8)")
    p.add_argument("dst", help="output folder (absent or empty, or the folder of an interrupted run with --resume)")
    p.add_argument("--format", dest="fmt", choices=list(FORMATS), default=COMPRESSED_TENSORS.name,
                   help="compressed-tensors (activation_use_clip, per-expert alpha) or ascendv1 (no clip)")
    p.add_argument("--quant-method", choices=list(COMPRESSED_TENSORS.quant_methods), default=None,
                   help="compressed-tensors only: the quant_method spelling written (default compressed-tensors; "
                        "modelslim is what sglang 0.5.7's NPU path loads)")
    p.add_argument("--no-learn", action="store_true", help="round-to-nearest, every clip 1 (the baseline)")
    p.add_argument("--calib", help="calibration text file (UTF-8); default: the built-in calib split")
    p.add_argument("--tokenizer", help="local tokenizer folder (default: the source's own, else the byte tokenizer)")
    p.add_argument("--calib-sequences", type=int, default=DEFAULT_CALIB_SEQUENCES, help="calibration windows")
    p.add_argument("--calib-seq-len", type=int, default=DEFAULT_CALIB_SEQ_LEN, help="tokens per window")
    p.add_argument("--min-expert-tokens", type=int, default=DEFAULT_MIN_EXPERT_TOKENS,
                   help="experts routed fewer calibration tokens keep clips at 1 (reported)")
    p.add_argument("--no-weight-clip", action="store_true", help="learn only the activation clips")
    p.add_argument("--no-alpha", action="store_true", help="learn only the weight clips")
    p.add_argument("--gptq", action="store_true",
                   help="after the clip search, choose the int4 values by GPTQ with act-order (kept per expert "
                        "only where the held-out tokens do not get worse)")
    p.add_argument("--refine-steps", type=int, default=40, help="straight-through gradient steps refining alpha (0: grid only)")
    p.add_argument("--refine-form", choices=REFINE_FORMS, default="gram",
                   help="how the refinement's gradient is computed: gram (through W^T W, about 3x less work; the "
                        "default since converter version 2) or direct (version 1's bits)")
    p.add_argument("--keep-bf16", action="append", default=[], metavar="REGEX",
                   help="also keep modules matching REGEX unquantized (repeatable); defaults: "
                        + ", ".join(DEFAULT_KEEP_BF16))
    p.add_argument("--no-default-keep-bf16", action="store_true",
                   help="drop the default keep-bf16 patterns (MLA kv_a/q_a/kv_b, indexer) so they become W8A8")
    p.add_argument("--max-shard-size", type=_size, default=4 << 30, help="output shard size bound (e.g. 4GiB, 500MB)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads, which the native kernel's products follow too (default: torch's choice; "
                        "under torchrun, one per process unless OMP_NUM_THREADS says otherwise)")
    p.add_argument("--device", default="cpu",
                   help="where the calibration forward and the clip search run: cpu or cuda (under torchrun, each "
                        "process uses GPU LOCAL_RANK); the integer products are exact on both")
    p.add_argument("--resume", action="store_true", help="continue an interrupted conversion into DST")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Convert and print a short summary; errors surface as typed exceptions (exit code 2)."""
    keep = ([] if args.no_default_keep_bf16 else list(DEFAULT_KEEP_BF16)) + list(args.keep_bf16)
    settings = ClipSearchSettings(min_expert_tokens=args.min_expert_tokens, learn_weight_clip=not args.no_weight_clip,
                                  learn_alpha=not args.no_alpha, refine_steps=args.refine_steps,
                                  refine_form=args.refine_form, gptq=args.gptq)
    report = convert(
        args.src, args.dst, fmt=args.fmt, learn=not args.no_learn, calib=args.calib, tokenizer=args.tokenizer,
        calib_sequences=args.calib_sequences, calib_seq_len=args.calib_seq_len, clip_settings=settings,
        resume=args.resume, keep_bf16=keep, max_shard_bytes=args.max_shard_size, batch_size=args.batch_size,
        num_threads=args.threads, progress=not args.quiet, quant_method=args.quant_method, device=args.device,
    )
    if not report:  # a worker process of a torchrun launch: rank 0 reports
        return 0
    t, m = report["timing"], report["memory"]
    print(f"converted {args.src} -> {args.dst} ({report['format']}, "
          f"{'learned clips' if report['learned_clips'] else 'round-to-nearest'}): "
          f"{len(report['w4a8_moe_layers'])} W4A8 MoE layers, {t['source_bytes'] / 1e6:.1f} MB in {t['seconds']:.1f}s "
          f"({t['source_mb_per_s']:.2f} MB/s), peak RSS {m['peak_rss_bytes'] / 2**20:.0f} MiB")
    if report["calibration"]:
        print(f"calibration: {report['calibration']['tokens']} tokens, tokenizer: {report['calibration']['tokenizer']}")
    for key, unit in report["units"].items():
        moe = unit.get("moe")
        if moe and moe.get("layer_rel_err_rtn") is not None:
            print(f"  {key}: MoE output rel. error RTN {moe['layer_rel_err_rtn']:.3e} -> learned "
                  f"{moe['layer_rel_err_learned']:.3e}  experts {moe['expert_status']}")
    print(f"report: {args.dst}/{REPORT_FILE}")
    return 0
