"""The checkpoint formats by name, and the detection of a folder's format."""

from __future__ import annotations

from pathlib import Path

from w4a8moe.errors import CheckpointError
from w4a8moe.formats.ascendv1 import ASCENDV1
from w4a8moe.formats.base import CheckpointFormat, read_config
from w4a8moe.formats.compressed_tensors import COMPRESSED_TENSORS

FORMATS: dict[str, CheckpointFormat] = {f.name: f for f in (ASCENDV1, COMPRESSED_TENSORS)}
"""Format name -> format object (iterates over the names, as ``choices=`` wants)."""


def get_format(fmt: str | CheckpointFormat) -> CheckpointFormat:
    """The format object for a name (``"ascendv1"``, ``"compressed-tensors"``) or an object.

    Raises ``ValueError`` naming the known formats for anything else.
    """
    if isinstance(fmt, CheckpointFormat):
        return fmt
    try:
        return FORMATS[fmt]
    except (KeyError, TypeError):
        raise ValueError(f"fmt must be one of {tuple(FORMATS)}, got {fmt!r}") from None


def detect_format(directory: str | Path, config: dict | None = None) -> CheckpointFormat:
    """The format whose marker ``directory`` carries; raise if the folder has none or several.

    ``config`` is the folder's ``config.json`` (read when ``None``).
    """
    directory = Path(directory)
    if config is None:
        config = read_config(directory)
    found = [f for f in FORMATS.values() if f.detect(directory, config)]
    if len(found) > 1:
        raise CheckpointError(
            f"{directory}: both " + " and ".join(f.marker for f in found) + " are present; "
            "an AscendV1 checkpoint must not carry quantization_config"
        )
    if not found:
        raise CheckpointError(
            f"{directory}: not a W4A8 checkpoint: neither " + " nor ".join(f.marker for f in FORMATS.values())
        )
    return found[0]
