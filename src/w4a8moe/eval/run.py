"""Compare quantized checkpoints with their source model on held-out text.

For each model, on the same token windows:

- perplexity ``exp(mean next-token NLL)``;
- ``KL(P_source || P_model)`` of the next-token distributions, averaged over positions;
- top-1 agreement: how often the model's most likely next token is the source's;
- routing agreement (end to end): per MoE layer, the fraction of the source's top-k experts
  the model also picks when run on its own hidden states, averaged over tokens;
- MoE output error (isolated): per MoE layer, ``||block(x) - source_block(x)|| / ||source_block(x)||``
  with ``x`` the *source's* input to that block, so that each layer's own error is measured
  without the drift from earlier layers.

Baselines built in the same run: the bf16 source itself, W8A8 with int8 routed experts
(:mod:`w4a8moe.eval.baselines`), W4A8 round-to-nearest without clips, and, for every given
checkpoint that carries activation clips, the same checkpoint with ``apply_alpha=False``
(what upstream sglang computes).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from w4a8moe.data import load_text, token_batches
from w4a8moe.eval.baselines import w8a8_baseline, w8a8_linear_names
from w4a8moe.eval.capture import MoECapture, moe_block_modules
from w4a8moe.eval.metrics import (
    RunningMean,
    RunningRelativeL2,
    kl_divergence,
    next_token_nll,
    perplexity,
    routing_overlap,
    top1_agreement,
)
from w4a8moe.models.loading import load_model, resolve_device
from w4a8moe.models.tokenizer import load_tokenizer

SOURCE = "source"
W8A8 = "w8a8"
RTN = "w4a8-rtn"
W4A8 = "w4a8"
NO_ALPHA = "w4a8-no-alpha"


@dataclass
class EvalModel:
    """One model under evaluation: a display label, what kind of model it is, the module."""

    label: str
    kind: str
    model: nn.Module
    path: str | None = None
    apply_alpha: bool | None = None


@dataclass
class _Accumulators:
    nll: RunningMean = field(default_factory=RunningMean)
    kl: RunningMean = field(default_factory=RunningMean)
    top1: RunningMean = field(default_factory=RunningMean)
    routing: dict[int, RunningMean] = field(default_factory=dict)
    moe_error: dict[int, RunningRelativeL2] = field(default_factory=dict)
    seconds: float = 0.0


def load_source_model(source_dir: str | Path) -> nn.Module:
    """The bf16 transformers model of a Hugging Face checkpoint folder, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source_dir), dtype=torch.bfloat16)
    model.requires_grad_(False)
    return model.eval()


def build_rtn_checkpoint(source_dir: str | Path, out_dir: Path, progress: bool = False) -> str:
    """Convert the source round-to-nearest (every clip 1) into ``out_dir``; returns how it was built."""
    from w4a8moe.convert import convert

    convert(str(source_dir), str(out_dir), fmt="compressed-tensors", learn=False, progress=progress)
    return "w4a8moe.convert(learn=False)"


def evaluation_windows(text: str, tokenizer, seq_len: int, num_sequences: int | None) -> torch.Tensor:
    """Consecutive, non-overlapping ``[N, seq_len]`` token windows of ``text``.

    With ``num_sequences`` larger than the text allows, all full windows are used.
    """
    ids = tokenizer.encode(text)
    available = ids.numel() // seq_len
    if available == 0:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    n = available if num_sequences is None else min(num_sequences, available)
    return token_batches(ids, seq_len, n)


@torch.no_grad()
def evaluate_models(
    source: nn.Module, models: list[EvalModel], windows: torch.Tensor, batch_size: int = 8, progress: bool = True
) -> list[dict]:
    """Run the source and every model on ``windows`` and return one result dict per model.

    The first row is the source itself (KL 0, agreements 1, MoE error 0 by construction).
    """
    from tqdm import tqdm

    source_acc = _Accumulators()
    accs = [_Accumulators() for _ in models]
    moe_layers = sorted(moe_block_modules(source))
    batches = windows.split(batch_size)
    for batch in tqdm(batches, desc="evaluating", unit="batch", disable=not progress):
        start = time.perf_counter()
        with MoECapture().attach(source) as ref:
            ref_logits = source(input_ids=batch, use_cache=False).logits.float()
        source_acc.seconds += time.perf_counter() - start
        _accumulate(source_acc, ref_logits, ref_logits, batch, ref.ids, ref.ids, {}, ref, moe_layers)
        for entry, acc in zip(models, accs):
            start = time.perf_counter()
            with MoECapture(keep_tensors=False).attach(entry.model) as cap:
                logits = entry.model(input_ids=batch, use_cache=False).logits.float()
            blocks = moe_block_modules(entry.model)
            if sorted(blocks) != moe_layers:
                raise ValueError(f"{entry.label}: MoE layers {sorted(blocks)} differ from the source's {moe_layers}")
            isolated = {layer: blocks[layer](ref.inputs[layer]) for layer in moe_layers}
            acc.seconds += time.perf_counter() - start
            _accumulate(acc, ref_logits, logits, batch, ref.ids, cap.ids, isolated, ref, moe_layers)
    rows = [_row(EvalModel("bf16 source", SOURCE, source), source_acc, moe_layers)]
    rows += [_row(entry, acc, moe_layers) for entry, acc in zip(models, accs)]
    return rows


def _accumulate(acc: _Accumulators, ref_logits, logits, batch, ref_ids, ids, isolated, ref: MoECapture, layers) -> None:
    acc.nll.add(next_token_nll(logits, batch))
    # Position t's distribution predicts token t+1; the last position has no target but is
    # still a valid distribution to compare, so KL and agreement use every position.
    acc.kl.add(kl_divergence(ref_logits, logits))
    acc.top1.add(top1_agreement(ref_logits, logits))
    for layer in layers:
        acc.routing.setdefault(layer, RunningMean()).add(routing_overlap(ref_ids[layer], ids[layer]))
        out = isolated.get(layer, ref.outputs[layer])
        acc.moe_error.setdefault(layer, RunningRelativeL2()).add(out, ref.outputs[layer])


def _row(entry: EvalModel, acc: _Accumulators, layers: list[int]) -> dict:
    # Layer keys are strings so that the report reads back from JSON unchanged.
    routing = {str(layer): acc.routing[layer].mean for layer in layers}
    moe_error = {str(layer): acc.moe_error[layer].value for layer in layers}
    return {
        "label": entry.label,
        "kind": entry.kind,
        "path": entry.path,
        "apply_alpha": entry.apply_alpha,
        "tokens": acc.nll.count,
        "mean_nll": acc.nll.mean,
        "perplexity": perplexity(acc.nll.mean),
        "kl_mean": acc.kl.mean,
        "top1_agreement": acc.top1.mean,
        "routing_agreement": sum(routing.values()) / len(routing) if routing else math.nan,
        "routing_agreement_per_layer": routing,
        "moe_rel_l2_mean": sum(moe_error.values()) / len(moe_error) if moe_error else math.nan,
        "moe_rel_l2_per_layer": moe_error,
        "seconds": round(acc.seconds, 2),
    }


def evaluate(
    source_dir: str | Path,
    checkpoints: list[str | Path] = (),
    labels: list[str] | None = None,
    text: str | None = None,
    text_name: str = "heldout",
    seq_len: int = 128,
    num_sequences: int | None = 32,
    batch_size: int = 8,
    w8a8_baseline_model: bool = True,
    rtn_baseline: bool = True,
    rtn_checkpoint: str | Path | None = None,
    learned_baseline: bool = False,
    no_alpha_variants: bool = True,
    work_dir: str | Path | None = None,
    backend: str | None = None,
    progress: bool = True,
    device: str = "cpu",
) -> dict:
    """Evaluate W4A8 ``checkpoints`` (and the baselines) against the model in ``source_dir``.

    ``text`` defaults to the built-in held-out split (never used for training or
    calibration). The round-to-nearest baseline is ``rtn_checkpoint`` when given, else it is
    written under ``work_dir`` (default: a temporary folder, removed afterwards).
    ``learned_baseline`` also converts the source with learned clips (the converter's default)
    into ``work_dir`` and evaluates it like a given checkpoint. ``device`` (``"cpu"``,
    ``"cuda"``) is where every model runs. Returns the report dict (also what the command
    writes as JSON): settings and one row per model.
    """
    device = resolve_device(device)
    source_dir = Path(source_dir)
    labels = list(labels or [])
    if len(labels) > len(checkpoints):
        raise ValueError(f"{len(labels)} labels given for {len(checkpoints)} checkpoints")
    tokenizer = load_tokenizer(source_dir)
    windows = evaluation_windows(text if text is not None else load_text("heldout"), tokenizer, seq_len, num_sequences)
    windows = windows.to(device)
    source = load_source_model(source_dir)
    models: list[EvalModel] = []
    loaded: list[EvalModel] = []

    def add_checkpoint(path: str | Path, label: str) -> None:
        model = load_model(path, apply_alpha=True, backend=backend, device=device)
        loaded.append(EvalModel(label, W4A8, model, str(path), True))
        if no_alpha_variants and model.w4a8moe_checkpoint.activation_use_clip:
            loaded.append(EvalModel(f"{label} (apply_alpha=False)", NO_ALPHA,
                                    load_model(path, apply_alpha=False, backend=backend, device=device), str(path),
                                    False))

    for i, path in enumerate(checkpoints):
        add_checkpoint(path, labels[i] if i < len(labels) else Path(path).name)
    temp_dir = None
    rtn_builder = None
    try:
        if learned_baseline or (rtn_baseline and rtn_checkpoint is None):
            root = Path(work_dir) if work_dir is not None else Path(temp_dir := tempfile.mkdtemp(prefix="w4a8moe-eval-"))
        if learned_baseline:
            from w4a8moe.convert import convert

            learned_path = root / "w4a8-learned"
            if learned_path.exists():
                shutil.rmtree(learned_path)
            convert(str(source_dir), str(learned_path), fmt="compressed-tensors", learn=True, progress=progress)
            add_checkpoint(learned_path, "W4A8 learned clips")
        if rtn_baseline and rtn_checkpoint is not None:
            rtn_builder = "given"
            models.append(EvalModel("W4A8 RTN (no clip)", RTN,
                                    load_model(rtn_checkpoint, backend=backend, device=device),
                                    str(rtn_checkpoint), True))
        elif rtn_baseline:
            rtn_path = root / "w4a8-rtn"
            if rtn_path.exists():
                shutil.rmtree(rtn_path)
            rtn_builder = build_rtn_checkpoint(source_dir, rtn_path, progress)
            models.append(EvalModel("W4A8 RTN (no clip)", RTN, load_model(rtn_path, backend=backend, device=device),
                                    str(rtn_path), True))
        if w8a8_baseline_model:
            # Mirror the W8A8 Linears of the first quantized model, so the baseline differs in the experts only.
            reference = loaded[0].model if loaded else (models[0].model if models else None)
            names = None
            if reference is not None:
                names = w8a8_linear_names(reference, reference.w4a8moe_checkpoint.model_config)
            # Built from the CPU source; moving it remakes the W8A8 Linears' backend copies.
            models.insert(0, EvalModel("W8A8 (int8 experts)", W8A8, w8a8_baseline(source, names).to(device)))
        models += loaded
        source.to(device)
        rows = evaluate_models(source, models, windows, batch_size, progress)
    finally:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
    return {
        "source": str(source_dir),
        "text": text_name,
        "seq_len": seq_len,
        "num_sequences": int(windows.shape[0]),
        "tokens_per_model": int(windows.numel()),
        "rtn_builder": rtn_builder,
        "moe_layers": sorted(moe_block_modules(source)),
        "results": rows,
    }


def format_table(report: dict) -> str:
    """The report as a fixed-width text table (one line per model)."""
    header = (f"{'model':<38} {'ppl':>8} {'dppl%':>7} {'KL(src||q)':>11} {'top1':>7} {'route':>7} {'moe relL2':>10}")
    lines = [header, "-" * len(header)]
    base = report["results"][0]["perplexity"]
    for row in report["results"]:
        dppl = 100.0 * (row["perplexity"] / base - 1.0)
        lines.append(
            f"{row['label'][:38]:<38} {row['perplexity']:8.3f} {dppl:+7.2f} {row['kl_mean']:11.5f} "
            f"{row['top1_agreement']:7.4f} {row['routing_agreement']:7.4f} {row['moe_rel_l2_mean']:10.5f}"
        )
    lines.append(
        f"{report['tokens_per_model']} tokens of '{report['text']}' text ({report['num_sequences']} x {report['seq_len']}); "
        "KL in nats/token; route = routing agreement (end to end); moe relL2 = per-layer MoE output error "
        "given the source's input, mean over layers"
    )
    return "\n".join(lines)


def write_plot(report: dict, path: str | Path) -> str:
    """Write a PNG: per-layer MoE error and routing agreement, and KL per model.

    matplotlib is optional; without it nothing is written. Returns a message for the user.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    rows = [r for r in report["results"] if r["kind"] != SOURCE]
    layers = report["moe_layers"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for row in rows:
        axes[0].plot(layers, [row["moe_rel_l2_per_layer"][str(l)] for l in layers], marker="o", label=row["label"])
        axes[1].plot(layers, [row["routing_agreement_per_layer"][str(l)] for l in layers], marker="o", label=row["label"])
    axes[0].set(title="MoE block output error (source input)", xlabel="layer", ylabel="relative L2")
    axes[1].set(title="Routing agreement with source (end to end)", xlabel="layer", ylabel="fraction of top-k")
    axes[0].set_xticks(layers)
    axes[1].set_xticks(layers)
    axes[0].legend(fontsize=7)
    axes[2].barh([r["label"] for r in rows], [r["kl_mean"] for r in rows])
    axes[2].set(title="KL(source || model), nats/token")
    axes[2].ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    axes[2].invert_yaxis()
    axes[2].tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written to {path}"
