"""lm-eval integration: a local task run on a W4A8 checkpoint through the registered model.

Skipped unless the optional extra is installed (``pip install w4a8moe[lm-eval]``).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import random_hf_model

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("lm_eval.models.huggingface")

TEXTS = [
    "Now is the winter of our discontent made glorious summer.",
    "All the world's a stage, and all the men and women merely players.",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from w4a8moe.models.export import export_w4a8_checkpoint
    from w4a8moe.models.trained import write_byte_tokenizer

    model, cfg = random_hf_model()
    path = tmp_path_factory.mktemp("ckpt") / "w4a8"
    export_w4a8_checkpoint(model, cfg, path)
    write_byte_tokenizer(path)
    return path


def _task_dir(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (tmp_path / "task.yaml").write_text(
        "task: w4a8moe_local_ppl\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        "doc_to_text: '{{text}}'\n"
        "doc_to_target: '{{text}}'\n"
        "metric_list:\n"
        "  - metric: bits_per_byte\n"
        "    aggregation: bits_per_byte\n"
        "    higher_is_better: false\n"
    )
    return tmp_path


def test_local_task_matches_direct_loglikelihood(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import w4a8moe.eval.lm_harness  # noqa: F401  (registers the model)
    from lm_eval.tasks import TaskManager

    from w4a8moe.models import load_model

    out = lm_eval.simple_evaluate(
        model="w4a8moe", model_args=f"pretrained={checkpoint},backend=reference",
        tasks=["w4a8moe_local_ppl"], task_manager=TaskManager(include_path=str(_task_dir(tmp_path))),
        batch_size=1, device="cpu",
    )
    bpb = out["results"]["w4a8moe_local_ppl"]["bits_per_byte,none"]
    # The same quantity computed directly: each document scored from the end-of-text token (id 0).
    model = load_model(checkpoint, backend="reference")
    total_nll, total_bytes = 0.0, 0
    for text in TEXTS:
        ids = torch.tensor([[0] + list(text.encode())])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
        total_nll -= float(logp[0, :-1].gather(-1, ids[0, 1:].unsqueeze(-1)).sum())
        total_bytes += len(text.encode())
    assert bpb == pytest.approx(total_nll / total_bytes / math.log(2), rel=1e-3)
