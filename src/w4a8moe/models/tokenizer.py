"""The tokenizer of a model folder: its own files when present, else bytes for vocab-256 models."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from w4a8moe.data import ByteTokenizer
from w4a8moe.errors import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class HFTokenizer:
    """A transformers tokenizer behind the same ``encode``/``decode`` as :class:`ByteTokenizer`."""

    def __init__(self, tokenizer):
        self.hf = tokenizer
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> torch.Tensor:
        """int64 ids of ``text``, without special tokens."""
        return torch.tensor(self.hf(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.int64)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.hf.decode(values)


def has_tokenizer_files(directory: str | Path) -> bool:
    """Whether ``directory`` holds Hugging Face tokenizer files."""
    return any((Path(directory) / name).exists() for name in TOKENIZER_FILES)


def load_tokenizer(directory: str | Path) -> HFTokenizer | ByteTokenizer:
    """The model's tokenizer: transformers' ``AutoTokenizer`` on its files, else the byte tokenizer.

    The byte fallback is only taken for models whose ``config.json`` says ``vocab_size == 256``;
    any other model without tokenizer files raises :class:`ConfigError`.
    """
    directory = Path(directory)
    if has_tokenizer_files(directory):
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(str(directory)))
    config_path = directory / "config.json"
    vocab = json.loads(config_path.read_text()).get("vocab_size") if config_path.exists() else None
    if vocab == ByteTokenizer.vocab_size:
        return ByteTokenizer()
    raise ConfigError(
        f"{directory}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) and vocab_size={vocab}; "
        "only vocab-256 models fall back to the byte tokenizer"
    )
