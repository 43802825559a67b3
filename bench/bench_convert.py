"""Converter benchmark: throughput (source MB/s) and peak memory, RTN vs learned clips.

    python bench/bench_convert.py            # DeepSeek-V3-shaped random model, ~150 MB, 6 shards
    python bench/bench_convert.py --quick    # ~20 MB, a few seconds per run
    python bench/bench_convert.py --heldout  # also: held-out MoE-layer error, RTN vs learned,
                                             # on the trained tiny DeepSeek-V3 (trains it once)

Each conversion runs in its own process; on Linux its peak RSS is reset after the imports
(``/proc/self/clear_refs``) and read back (``VmHWM``) after the conversion, and the RSS after
imports is subtracted to show what the conversion itself holds (elsewhere ``ru_maxrss``). The
"data" column is the size-dependent part of the converter's documented working set:
``2 x max_shard_bytes`` (queued output shard + its serialisation) + ``2 x`` the largest
decoder layer's source tensors in the model dtype (the transformers layer + the tensors being
quantized) + ``4 x`` the calibration hidden states (layer input/output, MoE input/output).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import json, os, resource, sys, time
import torch
from w4a8moe.convert import convert
# Code the conversion imports lazily is imported first, so that the baseline holds all code.
import transformers.models.deepseek_v3.modeling_deepseek_v3
from transformers import AutoConfig, AutoTokenizer

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

linux = os.path.exists("/proc/self/clear_refs")
if linux:
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak (VmHWM) so that import-time transients do not count
else:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kwargs = json.loads(sys.argv[3])
report = convert(sys.argv[1], sys.argv[2], progress=False, **kwargs)
if linux:
    report["memory"]["peak_rss_bytes"] = status("VmHWM")
print(json.dumps({"timing": report["timing"], "memory": report["memory"], "baseline_rss_bytes": base,
                  "units": {k: v.get("moe", {}).get("layer_rel_err_learned") for k, v in report["units"].items()}}))
"""


def _config(quick: bool) -> dict:
    from w4a8moe.models import tiny_config

    if quick:
        return tiny_config("deepseek_v3", hidden_size=256, moe_intermediate_size=128, intermediate_size=512,
                           n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                           num_hidden_layers=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                           v_head_dim=32)
    return tiny_config("deepseek_v3", hidden_size=512, moe_intermediate_size=256, intermediate_size=1024,
                       n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2, num_hidden_layers=6,
                       kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)


def _run(src: Path, dst: Path, **kwargs) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(dst), json.dumps(kwargs)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"conversion failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _layer_source_bytes(src: Path) -> int:
    from w4a8moe.convert import SourceCheckpoint

    source = SourceCheckpoint(src)
    item = 2  # the model dtype (bf16) the layer is built in
    best = 0
    for layer, names in source.layer_names().items():
        if layer is None:
            continue
        numel = sum(int(torch_numel(source.tensors[n].shape)) for n in names)
        best = max(best, numel * item)
    return best


def torch_numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def bench_throughput(quick: bool, threads: int) -> None:
    from w4a8moe.convert.synthetic import make_fp8_checkpoint, make_hf_checkpoint

    config = _config(quick)
    shard = "4MB" if quick else "24MB"
    calib = dict(calib_sequences=8 if quick else 16, calib_seq_len=128, num_threads=threads)
    max_out = (8 if quick else 32) * 10**6
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        src = make_hf_checkpoint(config, tmp / "src", seed=0, max_shard_size=shard, outliers=True)
        fp8 = make_fp8_checkpoint(src, tmp / "src-fp8")
        shards = sorted(src.glob("*.safetensors"))
        print(f"source: DeepSeek-V3-shaped, hidden {config['hidden_size']}, {config['n_routed_experts']} experts, "
              f"{config['num_hidden_layers']} layers; {len(shards)} shards, "
              f"{sum(p.stat().st_size for p in shards) / 1e6:.1f} MB bf16 (built in {time.perf_counter() - t0:.1f}s); "
              f"torch threads {threads}")
        layer_bytes = _layer_source_bytes(src)
        rows = []
        for label, source, kwargs in [
            ("bf16 RTN (--no-learn)", src, dict(learn=False, num_threads=threads)),
            ("bf16 learned clips", src, calib),
            ("fp8 RTN (--no-learn)", fp8, dict(learn=False, num_threads=threads)),
            ("fp8 learned clips", fp8, calib),
        ]:
            r = _run(source, tmp / label.replace(" ", "_").replace("(", "").replace(")", ""),
                     max_shard_bytes=max_out, **kwargs)
            rows.append((label, r))
        print()
        header = (f"{'run':24} {'src MB':>7} {'sec':>7} {'MB/s':>8} {'vs RTN':>7} {'peak RSS':>9} {'- base':>8} "
                  f"{'data':>8} {'largest shard':>13}")
        print(header)
        print("-" * len(header))
        rtn_speed = {}
        for label, r in rows:
            t, m = r["timing"], r["memory"]
            kind = label.split()[0]
            speed = t["source_mb_per_s"]
            if "RTN" in label:
                rtn_speed[kind] = speed
            hidden = m["calibration_hidden_bytes"]
            bound = 2 * m["max_shard_bytes"] + 2 * layer_bytes + 4 * hidden
            mib = 2**20
            print(f"{label:24} {t['source_bytes'] / 1e6:7.1f} {t['seconds']:7.2f} {speed:8.2f} "
                  f"{speed / rtn_speed[kind]:6.3f}x {m['peak_rss_bytes'] / mib:8.0f}M "
                  f"{(m['peak_rss_bytes'] - r['baseline_rss_bytes']) / mib:7.0f}M {bound / mib:7.0f}M "
                  f"{m['largest_source_shard_bytes'] / mib:12.1f}M")
        print(f"\n'- base': peak RSS minus the process's RSS after imports; 'data': the data terms of the "
              f"bound, 2 x max_shard_bytes ({max_out / 1e6:.0f} MB) + 2 x largest layer in bf16 "
              f"({layer_bytes / 2**20:.1f} MiB) + 4 x calibration hidden states; the rest of '- base' is "
              f"size-independent (lazily initialised torch/transformers state, mapped source pages).")


def bench_heldout(threads: int) -> None:
    """Held-out MoE-layer error vs the unquantized layer, RTN vs learned, on the trained model."""
    from w4a8moe.convert import convert
    from w4a8moe.convert.evaluate import moe_layer_errors
    from w4a8moe.data import load_text
    from w4a8moe.models import tiny_trained_model_dir

    src = tiny_trained_model_dir()
    with tempfile.TemporaryDirectory(prefix="bench-heldout-") as tmp:
        tmp = Path(tmp)
        dirs = {}
        for label, kwargs in [("RTN", dict(learn=False)), ("learned", {}),
                              ("learned, ascendv1", dict(fmt="ascendv1"))]:
            dirs[label] = tmp / label.replace(", ", "-")
            convert(src, dirs[label], num_threads=threads, progress=False, **kwargs)
        errors = moe_layer_errors(src, dirs, load_text("heldout"), num_sequences=32, seq_len=256)
        pr = moe_layer_errors(src, {"learned, alpha ignored": dirs["learned"]}, load_text("heldout"),
                              num_sequences=32, seq_len=256, apply_alpha=False)
        errors.update(pr)
    labels = list(errors)
    print(f"\nheld-out MoE-layer output error ||y_q - y||^2 / ||y||^2 (built-in heldout split, 32 x 256 tokens), "
          f"model {src.name}")
    print(f"{'layer':>5} " + " ".join(f"{l:>22}" for l in labels) + f" {'learned / RTN':>14}")
    for layer in sorted(errors["RTN"]):
        vals = [errors[l][layer] for l in labels]
        print(f"{layer:5d} " + " ".join(f"{v:22.4e}" for v in vals) + f" {errors['learned'][layer] / errors['RTN'][layer]:14.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, seconds per run")
    parser.add_argument("--heldout", action="store_true", help="also the held-out error table on the trained model")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (1: stable figures on a shared machine; small matmuls "
                             "gain little from more)")
    args = parser.parse_args()
    bench_throughput(args.quick, args.threads)
    if args.heldout:
        bench_heldout(args.threads)


if __name__ == "__main__":
    main()
