"""Evaluation metrics against hand-computed values, and the evaluation run end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import random_hf_model
from w4a8moe.eval.metrics import (
    RunningMean,
    RunningRelativeL2,
    kl_divergence,
    next_token_nll,
    perplexity,
    relative_l2,
    routing_overlap,
    top1_agreement,
)


def test_nll_and_perplexity_by_hand():
    # Two positions predicting tokens 1 then 0 with known probabilities.
    logits = torch.log(torch.tensor([[[0.25, 0.75], [0.5, 0.5], [0.9, 0.1]]]))
    ids = torch.tensor([[0, 1, 0]])
    nll = next_token_nll(logits, ids)
    assert torch.allclose(nll, torch.tensor([[-math.log(0.75), -math.log(0.5)]]))
    mean = float(nll.mean())
    assert perplexity(mean) == pytest.approx(math.exp((-math.log(0.75) - math.log(0.5)) / 2))
    assert perplexity(mean) == pytest.approx(1 / math.sqrt(0.375))  # geometric mean of 1/p


def test_kl_identical_is_zero_and_known_value():
    a = torch.randn(3, 5, 11)
    assert float(kl_divergence(a, a).abs().max()) == 0.0
    p = torch.tensor([0.5, 0.5])
    q = torch.tensor([0.9, 0.1])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert float(kl_divergence(p.log(), q.log())) == pytest.approx(expected, rel=1e-6)
    assert float(kl_divergence(q.log(), p.log())) != pytest.approx(expected)  # direction matters


def test_top1_agreement():
    a = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    b = torch.tensor([[0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    assert top1_agreement(a, a).mean() == 1.0
    assert top1_agreement(a, b).tolist() == [1.0, 0.0, 1.0]


def test_relative_l2_and_running():
    ref = torch.tensor([3.0, 4.0])
    assert relative_l2(ref, ref) == 0.0
    assert relative_l2(torch.tensor([3.0, 5.0]), ref) == pytest.approx(1 / 5)
    run = RunningRelativeL2()
    run.add(torch.tensor([3.0, 5.0]), ref)
    run.add(torch.tensor([0.0]), torch.tensor([0.0]))
    assert run.value == pytest.approx(0.2)
    mean = RunningMean()
    mean.add(torch.tensor([1.0, 2.0]))
    mean.add(torch.tensor([6.0]))
    assert mean.mean == 3.0 and mean.count == 3


def test_routing_overlap_ignores_order():
    ref = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    same = torch.tensor([[3, 2, 1, 0], [7, 6, 5, 4]])
    half = torch.tensor([[0, 1, 8, 9], [9, 10, 11, 4]])
    assert routing_overlap(ref, same).tolist() == [1.0, 1.0]
    assert routing_overlap(ref, half).tolist() == [0.5, 0.25]
    with pytest.raises(ValueError):
        routing_overlap(ref, ref[:, :2])


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    """A small random DeepSeek-V3 Hugging Face folder (no training: fast)."""
    from w4a8moe.models.trained import write_byte_tokenizer

    model, cfg = random_hf_model()
    path = tmp_path_factory.mktemp("src") / "model"
    model.save_pretrained(path)
    write_byte_tokenizer(path)
    return path, model, cfg


def test_evaluate_identity_and_baselines(tmp_path, tiny_source):
    from w4a8moe.eval.run import EvalModel, evaluate_models, evaluation_windows, load_source_model
    from w4a8moe.eval.baselines import w8a8_baseline
    from w4a8moe.models.tokenizer import load_tokenizer

    path, _, _ = tiny_source
    source = load_source_model(path)
    windows = evaluation_windows("To be, or not to be: that is the question. " * 20, load_tokenizer(path), 32, 4)
    rows = evaluate_models(source, [EvalModel("copy", "source", load_source_model(path)),
                                    EvalModel("w8a8", "w8a8", w8a8_baseline(source))], windows, 2, progress=False)
    src, copy, w8a8 = rows
    # An identical model: KL 0, agreements 1, same perplexity, no MoE error.
    assert copy["kl_mean"] == 0.0 and copy["top1_agreement"] == 1.0 and copy["routing_agreement"] == 1.0
    assert copy["perplexity"] == src["perplexity"] and copy["moe_rel_l2_mean"] == 0.0
    # Perplexity is exp of the mean NLL computed independently here.
    with torch.no_grad():
        logits = source(input_ids=windows).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert src["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-4)
    assert src["tokens"] == windows.shape[0] * (windows.shape[1] - 1)
    # The quantized baseline is measurably different but close.
    assert 0 < w8a8["kl_mean"] < 0.05
    assert 0 < w8a8["moe_rel_l2_mean"] < 0.1
    assert set(w8a8["moe_rel_l2_per_layer"]) == {"1", "2"}


def test_eval_command_end_to_end(tmp_path, tiny_source, capsys):
    from w4a8moe.cli import main
    from w4a8moe.models.export import export_w4a8_checkpoint

    path, model, cfg = tiny_source
    alpha = {layer: torch.full((8,), 0.6) for layer in (1, 2)}
    export_w4a8_checkpoint(model, cfg, tmp_path / "clip", alpha=alpha)
    out = tmp_path / "report.json"
    rc = main(["eval", str(path), str(tmp_path / "clip"), "--label", "clipped", "--num-sequences", "2",
               "--seq-len", "64", "--json", str(out), "--plot", str(tmp_path / "plot.png"), "--quiet",
               "--work-dir", str(tmp_path / "work")])
    assert rc == 0
    report = json.loads(out.read_text())
    labels = [r["label"] for r in report["results"]]
    assert labels == ["bf16 source", "W8A8 (int8 experts)", "W4A8 RTN (no clip)", "clipped",
                      "clipped (apply_alpha=False)"]
    rows = {r["label"]: r for r in report["results"]}
    # The clip-free row of the clipped checkpoint is exactly RTN when the weights are RTN.
    assert rows["clipped (apply_alpha=False)"]["kl_mean"] == pytest.approx(rows["W4A8 RTN (no clip)"]["kl_mean"], rel=1e-6)
    assert rows["clipped"]["kl_mean"] != rows["clipped (apply_alpha=False)"]["kl_mean"]
    printed = capsys.readouterr().out
    assert "clipped (apply_alpha=False)" in printed and "ppl" in printed

    from w4a8moe.eval.run import write_plot

    pytest.importorskip("matplotlib")
    assert "written" in write_plot(report, tmp_path / "again.png")  # a report read back from JSON plots too
    assert (tmp_path / "again.png").stat().st_size > 0
