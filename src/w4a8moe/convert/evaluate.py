"""MoE-layer output error of W4A8 checkpoints against their unquantized source, on any text.

The source model runs layer by layer (as in calibration) on the text; at each W4A8 MoE layer
the float block's input and output are captured, and each checkpoint's runtime layer
(:meth:`Checkpoint.moe_layer`) is run on the same input. Every layer sees the float model's
hidden states, so the figures isolate each layer's own quantization error.
"""

from __future__ import annotations

from pathlib import Path

import torch

from w4a8moe.convert.runner import LayerRunner
from w4a8moe.convert.source import SourceCheckpoint
from w4a8moe.data import ByteTokenizer, token_batches
from w4a8moe.errors import ConversionError
from w4a8moe.formats.checkpoint import open_checkpoint


def _tokens(source: SourceCheckpoint, text: str, tokenizer: str | Path | None) -> torch.Tensor:
    tok_dir = Path(tokenizer) if tokenizer is not None else None
    if tok_dir is None and (source.path / "tokenizer.json").exists():
        tok_dir = source.path
    if tok_dir is None:
        return ByteTokenizer().encode(text)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    return torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.int64)


@torch.no_grad()
def moe_layer_errors(src: str | Path, checkpoints: dict[str, str | Path], text: str, num_sequences: int = 16,
                     seq_len: int = 256, tokenizer: str | Path | None = None, batch_size: int = 8,
                     apply_alpha: bool = True, backend: str = "reference") -> dict[str, dict[int, float]]:
    """``{label: {layer: relative squared error}}`` of each checkpoint's MoE layers on ``text``.

    The error is ``||y_w4a8 - y_float||^2 / ||y_float||^2`` over all tokens of the first
    ``num_sequences`` windows of ``seq_len`` tokens, ``y_float`` the source model's MoE block
    output (transformers' layer, model dtype) and ``y_w4a8`` the checkpoint's runtime layer
    (kernel ``backend``, the exact reference by default).
    """
    source = SourceCheckpoint(src)
    opened = {label: open_checkpoint(path) for label, path in checkpoints.items()}
    layers = sorted(set().union(*(set(c.moe_layers) for c in opened.values())))
    runner = LayerRunner(source, source.compute_dtype(), batch_size)
    ids = _tokens(source, text, tokenizer)
    available = ids.numel() // seq_len
    if available < 1:
        raise ConversionError(f"text gives {ids.numel()} tokens, fewer than one window of {seq_len}")
    hidden = runner.embed(token_batches(ids, seq_len, min(num_sequences, available)))
    errors: dict[str, dict[int, float]] = {label: {} for label in opened}
    for layer in range(max(layers) + 1):
        module = runner.build_layer(layer)
        hidden, acts = runner.run(module, hidden, capture_moe=layer in layers)
        del module
        if layer not in layers:
            continue
        ref = acts.moe_output.to(torch.float64)
        energy = float((ref ** 2).sum())
        for label, ckpt in opened.items():
            if layer not in ckpt.moe_layers:
                continue
            out = ckpt.moe_layer(layer, apply_alpha=apply_alpha, backend=backend)(acts.moe_input).to(torch.float64)
            errors[label][layer] = float(((out - ref) ** 2).sum()) / energy
    return errors
