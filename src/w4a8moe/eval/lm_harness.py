"""lm-evaluation-harness integration (optional extra: ``pip install w4a8moe[lm-eval]``).

Importing this module registers the model name ``w4a8moe`` with lm-eval: an ``HFLM`` whose
model is a W4A8 checkpoint loaded by :func:`w4a8moe.load_model`. lm-eval discovers only its
own models, so run it through this module, which registers the name and hands the command
line to lm-eval unchanged::

    python -m w4a8moe.eval.lm_harness run --model w4a8moe \\
        --model_args pretrained=PATH[,apply_alpha=False][,backend=reference] \\
        --tasks my_task --include_path my_tasks/ --device cpu

or, from Python, ``import w4a8moe.eval.lm_harness`` and then
``lm_eval.simple_evaluate(model="w4a8moe", model_args="pretrained=PATH", ...)``.

The tokenizer is the checkpoint's own (``tokenizer=`` overrides); a vocab-256 checkpoint
without tokenizer files gets the byte tokenizer.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as exc:  # the optional extra is not installed
    raise ImportError(
        "w4a8moe.eval.lm_harness needs lm-evaluation-harness: pip install 'w4a8moe[lm-eval]'"
    ) from exc

MODEL_NAME = "w4a8moe"


def _as_bool(value: bool | str) -> bool:
    """lm-eval passes ``--model_args`` values as strings (or already parsed literals)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean, got {value!r}")


def _tokenizer_for(path: Path, tokenizer: str | None):
    from transformers import AutoTokenizer

    from w4a8moe.models.tokenizer import load_tokenizer
    from w4a8moe.models.trained import write_byte_tokenizer

    if tokenizer is not None:
        return AutoTokenizer.from_pretrained(tokenizer)
    loaded = load_tokenizer(path)  # raises ConfigError if there is none and vocab != 256
    if hasattr(loaded, "hf"):
        return loaded.hf
    with tempfile.TemporaryDirectory() as tmp:
        write_byte_tokenizer(tmp)
        return AutoTokenizer.from_pretrained(tmp)


@register_model(MODEL_NAME)
class W4A8MoELM(HFLM):
    """lm-eval's Hugging Face causal-LM wrapper around a loaded W4A8 checkpoint (CPU, bf16)."""

    def __init__(
        self,
        pretrained: str,
        apply_alpha: bool | str = True,
        backend: str | None = None,
        tokenizer: str | None = None,
        validate: str = "full",
        **kwargs,
    ):
        from w4a8moe.models.loading import load_model

        path = Path(pretrained)
        model = load_model(path, apply_alpha=_as_bool(apply_alpha), backend=backend, validate=validate)
        kwargs.setdefault("device", "cpu")
        kwargs.pop("dtype", None)  # the model is built in its own precision
        super().__init__(pretrained=model, tokenizer=_tokenizer_for(path, tokenizer), **kwargs)
        self.checkpoint_path = str(path)


def main() -> None:
    """lm-eval's command line with the ``w4a8moe`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
