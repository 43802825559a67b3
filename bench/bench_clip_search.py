"""Benchmark: one expert's clip search, float64 products (the old path) against the kernel's.

Run ``python bench/bench_clip_search.py`` (``--quick`` for a short run at a quarter of the
shapes). One expert with DeepSeek-V3's expert shapes (H=7168, I=2048) and 256 routed tokens
(what an expert sees with the converter's default calibration on the real model) goes
through :func:`w4a8moe.calibrate.learn_expert_clips` in the same process with

* ``reference``: the reference backend, whose ``int_matmul`` is the float64 matmul the clip
  search used before it ran on the kernel backends (the baseline; its loop is today's, so
  the ratio slightly understates the gain over the old code);
* ``cpu``: the native kernel (int8 GEMM; the per-grid int4 weight quantized straight into
  its layout), at every thread count given by ``--threads`` (default: 1 and all), with the
  refinement's gradient in version 1's direct form and in the Gram form (the default since
  converter version 2; :func:`w4a8moe.calibrate.clips.refine_alpha_ste`).

The baseline is converter version 1's search (float64 products, direct form), run at each
thread count; speed-ups are against it at the same count. The cpu run with the direct form
must give its clips, alpha and errors bit for bit (the bench fails otherwise); the Gram form
says whether it does (its fp32 matmuls round otherwise). The table
splits each run's time into the integer products, the weight quantization for them, the
straight-through refinement of alpha (fp32 matmuls) and the rest (the float reference, errors, SwiGLU). The expert has a few
gate/up channels with large outputs that the down projection barely uses, so the activation
clip moves off 1 and the refinement really runs (an expert whose best alpha stays 1 costs
less). ``--no-refine`` times the search with ``refine_steps = 0`` as well. The last lines
extrapolate to DeepSeek-V3 (256 experts x 58 MoE layers), clip search only. ``--today [REV]``
also times the search as the code at git revision REV ran it (default: the code issue #12
measured, before the products ran on the kernel backends), exported from git into a temporary
folder and run in a subprocess on the same expert, and checks it learns the same clips.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import torch

from w4a8moe.calibrate import ClipSearchSettings, ExpertWeights, clips as clips_module, learn_expert_clips
from w4a8moe.calibrate.products import IntProducts
from w4a8moe.kernels import get_backend

HIDDEN, INTER, TOKENS = 7168, 2048, 256
DEEPSEEK_EXPERTS, DEEPSEEK_MOE_LAYERS = 256, 58


def make_expert(hidden: int, inter: int, tokens: int, seed: int = 0) -> tuple[torch.Tensor, ExpertWeights]:
    """Random fp32 expert weights and bf16 routed rows, with a few outlier channels in h."""
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(inter, hidden, generator=g) / hidden**0.5
    up = torch.randn(inter, hidden, generator=g) / hidden**0.5
    down = torch.randn(hidden, inter, generator=g) / inter**0.5
    outliers = torch.arange(0, inter, max(1, inter // 8))[:8]
    gate[outliers] *= 12.0
    up[outliers] *= 12.0
    down[:, outliers] *= 1e-3
    x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
    return x, ExpertWeights(gate, up, down)


class TimedProducts(IntProducts):
    """:class:`IntProducts` that adds up the seconds of its products and quantizations."""

    def __init__(self, backend: object):
        super().__init__(backend)
        self.product_s = 0.0
        self.quantize_s = 0.0

    def weight_operands(self, weight, scales, reuse=None):
        t = time.perf_counter()
        out = super().weight_operands(weight, scales, reuse)
        self.quantize_s += time.perf_counter() - t
        return out

    def int32(self, a_q, operand):
        t = time.perf_counter()
        out = super().int32(a_q, operand)
        self.product_s += time.perf_counter() - t
        return out


def timed_search(x: torch.Tensor, w: ExpertWeights, backend: object, settings: ClipSearchSettings
                 ) -> tuple[object, dict[str, float]]:
    """One :func:`learn_expert_clips` call with its time split (see the module docstring)."""
    products = TimedProducts(backend)
    refine = clips_module.refine_alpha_ste
    spent = {"refine": 0.0}

    def timed_refine(*args, **kwargs):
        t = time.perf_counter()
        try:
            return refine(*args, **kwargs)
        finally:
            spent["refine"] += time.perf_counter() - t

    clips_module.refine_alpha_ste = timed_refine
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            result = learn_expert_clips(x, w, settings, products=products)
        total = time.perf_counter() - t0
    finally:
        clips_module.refine_alpha_ste = refine
    times = {"total": total, "products": products.product_s, "quantize": products.quantize_s,
             "refine": spent["refine"]}
    times["other"] = total - times["products"] - times["quantize"] - times["refine"]
    return result, times


def same_result(a, b) -> bool:
    """Identical clips, alpha, errors and notes."""
    fields = ("alpha", "status", "err_rtn", "err_learned", "heldout_err_rtn", "heldout_err_learned",
              "alpha_grid_best", "notes")
    return all(getattr(a, f) == getattr(b, f) for f in fields) and all(
        torch.equal(a.weight_clip[p], b.weight_clip[p]) for p in a.weight_clip)


def same_clips(a, b) -> bool:
    """Identical weight clips and alpha."""
    return a.alpha == b.alpha and all(torch.equal(a.weight_clip[p], b.weight_clip[p]) for p in a.weight_clip)


TODAY_REV = "0d355ec"
"""The last commit before the clip search ran on the kernel backends: the search issue #12
measured (40 s per expert at DeepSeek-V3 shapes, float64 products)."""

_TODAY_SCRIPT = """
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from w4a8moe.calibrate import ClipSearchSettings, ExpertWeights, learn_expert_clips
torch.set_num_threads(int(sys.argv[3]))
saved = torch.load(sys.argv[2])
x, w = saved["x"], ExpertWeights(saved["gate"], saved["up"], saved["down"])
t0 = time.perf_counter()
with torch.no_grad():
    r = learn_expert_clips(x, w, ClipSearchSettings())
seconds = time.perf_counter() - t0
print("TODAY " + json.dumps({"seconds": seconds, "alpha": r.alpha,
                              "clips": {p: c.tolist() for p, c in r.weight_clip.items()}}))
"""


def time_today(rev: str, threads: int, x: torch.Tensor, w: ExpertWeights) -> dict:
    """The clip search of the code at git revision ``rev`` (its ``src`` exported to a temporary
    folder) on the same expert, in a subprocess with ``threads`` torch threads."""
    import json
    import subprocess
    import sys
    import tarfile
    import tempfile
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(repo), "archive", rev, "src"], capture_output=True, check=True)
        tar_path = Path(tmp) / "src.tar"
        tar_path.write_bytes(archive.stdout)
        with tarfile.open(tar_path) as tar:
            tar.extractall(tmp, filter="data")
        expert = Path(tmp) / "expert.pt"
        torch.save({"x": x, "gate": w.gate, "up": w.up, "down": w.down}, expert)
        proc = subprocess.run([sys.executable, "-c", _TODAY_SCRIPT, str(Path(tmp) / "src"), str(expert), str(threads)],
                              capture_output=True, text=True, cwd=tmp)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("TODAY ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"the search at {rev} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(line.split(" ", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of H and I, 128 tokens")
    parser.add_argument("--threads", default=None, help="comma-separated thread counts for the cpu runs")
    parser.add_argument("--no-refine", action="store_true", help="also time the search with refine_steps = 0")
    parser.add_argument("--today", nargs="?", const=TODAY_REV, default=None, metavar="REV",
                        help=f"also time the search of git revision REV (default {TODAY_REV}, the code the issue "
                             "measured) on the same expert, in a subprocess per thread count")
    args = parser.parse_args()
    hidden, inter, tokens = (HIDDEN // 4, INTER // 4, TOKENS // 2) if args.quick else (HIDDEN, INTER, TOKENS)
    all_threads = torch.get_num_threads()
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, all_threads})
    print(f"clip search of one expert: H={hidden} I={inter}, {tokens} tokens; torch {torch.__version__}, "
          f"{all_threads} threads; load average before {os.getloadavg()}")
    x, w = make_expert(hidden, inter, tokens)
    cpu = get_backend("cpu")
    reference = get_backend("reference")
    settings_list = [("refine 40", ClipSearchSettings())]
    if args.no_refine:
        settings_list.append(("refine 0", ClipSearchSettings(refine_steps=0)))
    header = (f"{'settings':<10} {'backend':<10} {'form':<6} {'thr':>3} {'total s':>9} {'products':>14} "
              f"{'quantize':>14} {'refine':>14} {'other':>14} {'speed-up':>9}")
    print(header)
    print("-" * len(header))
    fastest: dict[str, float] = {}
    for label, settings in settings_list:
        # The baseline is converter version 1's search: float64 products, the direct form, at
        # each thread count (torch's fp32 matmuls round by thread count; the products cannot).
        old = replace(settings, refine_form="direct")
        forms = ("direct", "gram") if settings.refine_steps > 0 else ("direct",)
        rows, notes = [], []
        for n in threads:
            torch.set_num_threads(n)
            base, base_t = timed_search(x, w, reference, old)
            rows.append(("reference", "direct", n, base_t, base_t))
            for form in forms:
                result, t = timed_search(x, w, cpu, replace(settings, refine_form=form))
                if form == "direct" and not same_result(base, result):
                    raise SystemExit(f"cpu backend ({n} threads) learned different clips than the reference")
                rows.append(("cpu", form, n, t, base_t))
                if form != "direct":
                    notes.append(f"  (cpu {form}, {n} thread(s): clips "
                                 f"{'identical' if same_clips(base, result) else 'DIFFERENT'}, errors "
                                 f"{'identical' if same_result(base, result) else 'differ in the last bits'} "
                                 f"against the baseline)")
        torch.set_num_threads(all_threads)
        for name, form, n, t, base_t in rows:
            parts = " ".join(f"{t[k]:8.2f} ({t[k] / t['total']:3.0%})" for k in ("products", "quantize", "refine",
                                                                                 "other"))
            print(f"{label:<10} {name:<10} {form:<6} {n:>3} {t['total']:9.2f} {parts} "
                  f"{base_t['total'] / t['total']:8.1f}x")
        for note in notes:
            print(note)
        fastest[label] = min(t["total"] for name, form, _, t, _ in rows if name == "cpu" and form == forms[-1])
        print(f"{label:<10} alpha {base.alpha} (grid best {base.alpha_grid_best}), status {base.status}; the "
              f"direct form gives the reference's bits on the kernel at every thread count")
    if args.today:
        print(f"\nthe search of revision {args.today} (the code before this work) on the same expert, "
              f"one subprocess per thread count, against the fastest form here:")
        for n in threads:
            old_run = time_today(args.today, n, x, w)
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            with torch.no_grad():
                now = learn_expert_clips(x, w, ClipSearchSettings(), products=IntProducts(cpu))
            seconds = time.perf_counter() - t0
            same = old_run["alpha"] == now.alpha and all(
                old_run["clips"][p] == now.weight_clip[p].tolist() for p in now.weight_clip)
            print(f"  {n} thread(s): {args.today} {old_run['seconds']:.2f} s, now {seconds:.2f} s: "
                  f"{old_run['seconds'] / seconds:.1f}x; clips and alpha {'identical' if same else 'DIFFERENT'}")
        torch.set_num_threads(all_threads)
    print(f"load average after {os.getloadavg()}")
    if not args.quick:
        n = DEEPSEEK_EXPERTS * DEEPSEEK_MOE_LAYERS
        for label, seconds in fastest.items():
            print(f"DeepSeek-V3 clip search ({label}): {seconds:.2f} s/expert x {DEEPSEEK_EXPERTS} experts x "
                  f"{DEEPSEEK_MOE_LAYERS} MoE layers = {seconds * n / 3600:.1f} h on this machine")


if __name__ == "__main__":
    main()
