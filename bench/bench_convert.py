"""Converter benchmark: throughput (source MB/s) and peak memory, RTN vs learned clips.

    python bench/bench_convert.py            # DeepSeek-V3-shaped random model, ~150 MB, 6 shards
    python bench/bench_convert.py --quick    # ~20 MB, a few seconds per run
    python bench/bench_convert.py --heldout  # also: held-out MoE-layer error, RTN vs learned,
                                             # on the trained tiny DeepSeek-V3 (trains it once)
    python bench/bench_convert.py --scale            # DeepSeek-V3 layer shapes, 16 and 64 experts
    python bench/bench_convert.py --scale --quick    # the same shapes, 4 and 8 experts, RTN only

``--scale``: sources of DeepSeek-V3's real layer dimensions (hidden 7168, expert intermediate
2048, dense intermediate 18432, the real MLA sizes, 128 heads; one dense and one MoE layer; a
512-token vocabulary) with a configurable number of routed experts, bf16 and block-FP8,
written tensor by tensor under ``--tmp`` (16 experts: 3.1 GB bf16; 64: 7.3 GB) and deleted
after their runs. Each conversion runs in its own process, sampled every 5 ms from outside
for its resident (VmRSS, VmHWM) and anonymous (RssAnon) memory. The table gives seconds per
expert, source MB/s, and peak memory against one expert's and one layer's source bytes; the
marginal cost per expert (the slope between two expert counts) is extrapolated to
DeepSeek-V3 (256 experts x 58 MoE layers), with the arithmetic printed.

Each conversion runs in its own process; on Linux its peak RSS is reset after the imports
(``/proc/self/clear_refs``) and read back (``VmHWM``) after the conversion, and the RSS after
imports is subtracted to show what the conversion itself holds (elsewhere ``ru_maxrss``). The
"data" column is the size-dependent part of the converter's documented working set:
``max_shard_bytes`` (the queued output shard; ``save_file`` writes it without a copy) + ``2 x``
the largest decoder layer's source tensors in the model dtype (an upper bound on the layer's
parts outside the routed experts plus the tensor being quantized) + ``4 x`` the calibration
hidden states (layer input/output, MoE input/output).
"""

from __future__ import annotations

import argparse
import json
import shutil
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


def _proc_status(pid: int) -> dict[str, int]:
    """``/proc/PID/status`` memory lines in bytes (empty when the process is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def _run(src: Path, dst: Path, **kwargs) -> dict:
    """One conversion in a child process; ``peak_anon_bytes``: the largest RssAnon sampled (Linux)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(src), str(dst), json.dumps(kwargs)],
                                stdout=out, stderr=err, text=True)
        peak_anon = 0
        while proc.poll() is None:
            peak_anon = max(peak_anon, _proc_status(proc.pid).get("RssAnon", 0))
            time.sleep(0.005)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise SystemExit(f"conversion failed:\n{err.read()[-3000:]}")
        result = json.loads(out.read().strip().splitlines()[-1])
    result["peak_anon_bytes"] = peak_anon or None
    return result


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
            bound = m["max_shard_bytes"] + 2 * layer_bytes + 4 * hidden
            mib = 2**20
            print(f"{label:24} {t['source_bytes'] / 1e6:7.1f} {t['seconds']:7.2f} {speed:8.2f} "
                  f"{speed / rtn_speed[kind]:6.3f}x {m['peak_rss_bytes'] / mib:8.0f}M "
                  f"{(m['peak_rss_bytes'] - r['baseline_rss_bytes']) / mib:7.0f}M {bound / mib:7.0f}M "
                  f"{m['largest_source_shard_bytes'] / mib:12.1f}M")
        print(f"\n'- base': peak RSS minus the process's RSS after imports; 'data': the data terms of the "
              f"bound, max_shard_bytes ({max_out / 1e6:.0f} MB) + 2 x largest layer in bf16 "
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


# ------------------------------------------------------------------ --scale
DSV3_EXPERTS = 256
DSV3_MOE_LAYERS = 58
DSV3_LAYERS = 61


def scale_config(experts: int) -> dict:
    """DeepSeek-V3's layer dimensions (``config.json`` of the release) with ``experts`` routed
    experts, one dense and one MoE layer, and a 512-token vocabulary (the embedding is not
    what is measured). Routing keeps top-8 of 8 groups (top-4 groups) where the count allows."""
    from w4a8moe.models import tiny_config

    n_group = min(8, max(1, experts // 2))  # transformers' router takes the top 2 of each group
    while experts % n_group:
        n_group -= 1
    topk_group = max(1, min(4, n_group // 2))
    top_k = min(8, topk_group * (experts // n_group))
    return tiny_config(
        "deepseek_v3", hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=experts, n_shared_experts=1,
        num_experts_per_tok=top_k, n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.5,
        num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab_size=512,
        max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False)


def _source_layout(config: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """``(name, shape, kind)`` of every source tensor, from transformers' model on the meta
    device (kinds: ``linear``, ``norm``, ``embed``, ``bias``); routed experts per expert,
    named as the released checkpoints name them."""
    import torch
    from transformers import AutoModelForCausalLM

    from w4a8moe.formats.model_config import MoEModelConfig
    from w4a8moe.models.loading import transformers_config

    names = MoEModelConfig.from_dict(config).names
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(transformers_config(config))
    out = []
    for key, t in model.state_dict().items():
        shape = tuple(t.shape)
        if key.endswith("experts.gate_up_proj") or key.endswith("experts.down_proj"):
            layer = int(key.split(".")[2])
            for e in range(shape[0]):
                if key.endswith("gate_up_proj"):
                    half = (shape[1] // 2, shape[2])
                    out += [(names.expert_weight(layer, e, "gate") + ".weight", half, "linear"),
                            (names.expert_weight(layer, e, "up") + ".weight", half, "linear")]
                else:
                    out.append((names.expert_weight(layer, e, "down") + ".weight", shape[1:], "linear"))
        elif key.endswith("e_score_correction_bias"):
            out.append((key, shape, "bias"))
        elif "norm" in key:
            out.append((key, shape, "norm"))
        else:
            out.append((key, shape, "embed" if "embed" in key else "linear"))
    return out


def build_scale_source(config: dict, path: Path, fp8: bool, seed: int = 0, shard_bytes: int = 512 << 20) -> Path:
    """Write a random source of ``config`` tensor by tensor (never the whole model in memory):
    bf16 (std 0.02 linears, unit norms, a few massive norm channels and outlier weight columns),
    or its DeepSeek block-FP8 form (128 x 128 scales)."""
    import torch

    from w4a8moe.convert.synthetic import _fp8_target, quantize_fp8_blockwise
    from w4a8moe.formats.safetensors_io import atomic_save_safetensors

    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    pending: dict[str, torch.Tensor] = {}
    files = 0

    def flush() -> None:
        nonlocal files, pending
        if pending:
            files += 1
            fname = f"model-{files:05d}.safetensors"
            atomic_save_safetensors(path / fname, pending, {"format": "pt"})
            weight_map.update({n: fname for n in pending})
            pending = {}

    held = 0
    for name, shape, kind in _source_layout(config):
        if kind == "bias":
            tensors = {name: 0.05 * torch.randn(shape, generator=gen)}
        elif kind == "norm":
            w = torch.ones(shape)
            if name.endswith("post_attention_layernorm.weight"):
                w[torch.randperm(shape[0], generator=gen)[: shape[0] // 32]] = 12.0
            tensors = {name: w.to(torch.bfloat16)}
        else:
            w = torch.randn(shape, generator=gen).mul_(0.02)
            if ".experts." in name:
                w[:, torch.randperm(shape[1], generator=gen)[: shape[1] // 16]] *= 6.0
            w = w.to(torch.bfloat16)
            if fp8 and _fp8_target(name, w):
                q, s = quantize_fp8_blockwise(w)
                tensors = {name: q, name + "_scale_inv": s}
            else:
                tensors = {name: w}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if held and held + size > shard_bytes:
            flush()
            held = 0
        pending.update(tensors)
        held += size
    flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = dict(config)
    if fp8:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def _layer_bytes(src: Path) -> tuple[int, int]:
    """Source bytes of one routed expert (layer 1, expert 0, scales included) and of the MoE layer."""
    from w4a8moe.convert import SourceCheckpoint

    source = SourceCheckpoint(src)
    names = source.model_config.names
    layer_names = source.layer_names()[1]
    expert = [n for n in layer_names if n.startswith(names.expert_weight(1, 0, "gate").rsplit(".", 1)[0] + ".")]
    return source.source_bytes_of(expert), source.source_bytes_of(layer_names)


def _check_memory(need_gb: float) -> None:
    """Refuse to start a run when the machine has less than ``need_gb`` available."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) / 2**20
                if avail < need_gb:
                    raise SystemExit(f"only {avail:.1f} GiB available, this run needs about {need_gb:.1f} GiB")
    except OSError:
        pass


def bench_scale(experts_list: list[int], learned_experts: list[int], dtypes: list[str], threads: int,
                calib_sequences: int, max_shard_bytes: int, tmp_root: Path | None,
                tokens_per_expert: int | None = None) -> None:
    mib = 2**20
    rows = []
    for experts in experts_list:
        config = scale_config(experts)
        for dtype in dtypes:
            with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=tmp_root) as tmp:
                tmp = Path(tmp)
                t0 = time.perf_counter()
                src = build_scale_source(config, tmp / "src", fp8=(dtype == "fp8"))
                src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
                expert_bytes, layer_bytes = _layer_bytes(src)
                print(f"source {dtype}, {experts} experts: {src_bytes / 1e9:.2f} GB "
                      f"(built in {time.perf_counter() - t0:.0f} s)", flush=True)
                modes = [("RTN", dict(learn=False))]
                if experts in learned_experts:
                    sequences = calib_sequences if tokens_per_expert is None else _calib_sequences_for(
                        experts, config.get("num_experts_per_tok", 8), tokens_per_expert)
                    modes.append(("learned", dict(calib_sequences=sequences, calib_seq_len=256)))
                for mode, kwargs in modes:
                    _check_memory(4.0)
                    dst = tmp / f"out-{mode}"
                    r = _run(src, dst, max_shard_bytes=max_shard_bytes, num_threads=threads, **kwargs)
                    shutil.rmtree(dst, ignore_errors=True)
                    rows.append(dict(experts=experts, dtype=dtype, mode=mode, seconds=r["timing"]["seconds"],
                                     calib=kwargs.get("calib_sequences"),
                                     mb_s=r["timing"]["source_mb_per_s"], src_bytes=r["timing"]["source_bytes"],
                                     peak_rss=r["memory"]["peak_rss_bytes"], peak_anon=r["peak_anon_bytes"],
                                     base=r["baseline_rss_bytes"], expert_bytes=expert_bytes,
                                     layer_bytes=layer_bytes))
                    x = rows[-1]
                    calib = f" ({x['calib']} x 256 calibration tokens)" if x["calib"] else ""
                    print(f"  {mode:8} {x['seconds']:7.1f} s, peak RSS {x['peak_rss'] / mib:6.0f} MiB, "
                          f"peak anon {(x['peak_anon'] or 0) / mib:6.0f} MiB{calib}", flush=True)
    _print_scale(rows, max_shard_bytes, calib_sequences, tokens_per_expert)


def _calib_sequences_for(experts: int, top_k: int, tokens_per_expert: int) -> int:
    """Calibration sequences of 256 tokens giving each of ``experts`` about
    ``tokens_per_expert`` routed tokens (top-``top_k`` routing)."""
    return max(1, round(tokens_per_expert * experts / top_k / 256))


def _print_scale(rows: list[dict], max_shard_bytes: int, calib_sequences: int,
                 tokens_per_expert: int | None = None) -> None:
    mib = 2**20
    calib = (f"--calib-sequences {calib_sequences} x 256 tokens" if tokens_per_expert is None else
             f"calibration sequences scaled with the experts, about {tokens_per_expert} routed tokens per expert "
             f"(so the slope holds the calibration forward of the added tokens, as the real model's default "
             f"calibration of 32 sequences for 256 experts would)")
    print(f"\nDeepSeek-V3 layer shapes (hidden 7168, expert intermediate 2048, MLA), one dense + one MoE "
          f"layer; --max-shard-size {max_shard_bytes / mib:.0f}MiB; learned: {calib}")
    header = (f"{'run':22} {'experts':>7} {'sec':>7} {'s/expert':>8} {'MB/s':>7} {'peak RSS':>9} {'peak anon':>9} "
              f"{'base':>6} {'expert':>7} {'layer':>7} {'RSS/layer':>9}")
    print(header)
    print("-" * len(header))
    for x in rows:
        anon = f"{x['peak_anon'] / mib:8.0f}M" if x["peak_anon"] else f"{'n/a':>9}"
        print(f"{x['dtype'] + ' ' + x['mode']:22} {x['experts']:7d} {x['seconds']:7.1f} "
              f"{x['seconds'] / x['experts']:8.2f} {x['mb_s']:7.1f} {x['peak_rss'] / mib:8.0f}M {anon} "
              f"{x['base'] / mib:5.0f}M {x['expert_bytes'] / mib:6.0f}M {x['layer_bytes'] / mib:6.0f}M "
              f"{x['peak_rss'] / x['layer_bytes']:9.2f}")
    print("(s/expert: the whole run over the expert count, dense layer and attention included; "
          "base: RSS after imports)")
    print("\nGrowth with the expert count (targets: RTN peak anon, learned peak RSS, <= +10 %), and the "
          "extrapolation to DeepSeek-V3 (256 routed experts x 58 MoE layers, 61 layers):")
    groups: dict[tuple[str, str], list[dict]] = {}
    for x in rows:
        groups.setdefault((x["dtype"], x["mode"]), []).append(x)
    for (dtype, mode), xs in groups.items():
        xs = sorted(xs, key=lambda x: x["experts"])
        lo, hi = xs[0], xs[-1]
        key = "peak_anon" if mode == "RTN" else "peak_rss"
        if len(xs) > 1 and lo[key] and hi[key]:
            growth = hi[key] / lo[key] - 1
            target = "met" if growth <= 0.10 else "NOT met"
            print(f"  {dtype} {mode}: {key.replace('_', ' ')} {lo[key] / mib:.0f} MiB at {lo['experts']} -> "
                  f"{hi[key] / mib:.0f} MiB at {hi['experts']} experts: {growth * 100:+.1f} % (target {target})")
            per_expert = (hi["seconds"] - lo["seconds"]) / (hi["experts"] - lo["experts"])
            fixed = lo["seconds"] - per_expert * lo["experts"]
            how = f"slope ({hi['seconds']:.1f} - {lo['seconds']:.1f}) s / ({hi['experts']} - {lo['experts']})"
        else:
            per_expert, fixed = lo["seconds"] / lo["experts"], 0.0
            how = f"{lo['seconds']:.1f} s / {lo['experts']} (fixed costs counted per expert)"
        total = DSV3_EXPERTS * DSV3_MOE_LAYERS * per_expert + fixed / 2 * DSV3_LAYERS
        print(f"    {dtype} {mode}: {per_expert:.2f} s per expert [{how}]; fixed {fixed:.1f} s for 2 layers; "
              f"DeepSeek-V3 ~ {DSV3_EXPERTS} x {DSV3_MOE_LAYERS} x {per_expert:.2f} s + {DSV3_LAYERS} x "
              f"{fixed / 2:.1f} s = {total / 3600:.1f} h")


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, seconds per run")
    parser.add_argument("--heldout", action="store_true", help="also the held-out error table on the trained model")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (1: stable figures on a shared machine; small matmuls "
                             "gain little from more)")
    parser.add_argument("--scale", action="store_true",
                        help="DeepSeek-V3 layer shapes with --experts routed experts (sources of GBs, under --tmp)")
    parser.add_argument("--experts", type=_int_list, default=None,
                        help="--scale: routed expert counts (default 16,64; --quick 4,8)")
    parser.add_argument("--learned-experts", type=_int_list, default=None,
                        help="--scale: the counts also converted with learned clips (default 16; --quick none)")
    parser.add_argument("--dtypes", default="bf16,fp8", help="--scale: source dtypes, bf16 and/or fp8")
    parser.add_argument("--calib-sequences", type=int, default=2,
                        help="--scale learned runs: calibration sequences of 256 tokens (2: about the 256 "
                             "tokens per expert the default calibration gives on the real model)")
    parser.add_argument("--tokens-per-expert", type=int, default=None,
                        help="--scale learned runs: scale the calibration sequences with the expert count to give "
                             "each expert about this many routed tokens (256: the real model's default), instead "
                             "of a fixed --calib-sequences (whose tokens per expert fall as experts are added)")
    parser.add_argument("--max-shard-size", type=int, default=256 << 20,
                        help="--scale: output shard bytes (default 256 MiB, below one 16-expert layer's output)")
    parser.add_argument("--tmp", type=Path, default=None, help="--scale: where the sources go (default: $TMPDIR)")
    args = parser.parse_args()
    if args.scale:
        experts = args.experts or ([4, 8] if args.quick else [16, 64])
        learned = args.learned_experts if args.learned_experts is not None else ([] if args.quick else [16, 64])
        bench_scale(experts, learned, args.dtypes.split(","), args.threads, args.calib_sequences,
                    args.max_shard_size, args.tmp, args.tokens_per_expert)
        return
    bench_throughput(args.quick, args.threads)
    if args.heldout:
        bench_heldout(args.threads)


if __name__ == "__main__":
    main()
