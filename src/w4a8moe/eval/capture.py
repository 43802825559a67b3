"""Forward hooks on MoE blocks: their inputs, outputs and expert choices during a forward pass.

Works on transformers MoE blocks (router at ``block.gate``, which returns
``(logits, weights, ids)``) and on the loaded model's :class:`W4A8MoEBlock` alike. Expert
choices are recomputed from the block's input by its own router (cheap next to the experts),
so no model code needs to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from w4a8moe.models.loading import W4A8MoEBlock


def moe_block_modules(model: nn.Module) -> dict[int, nn.Module]:
    """Layer index -> MoE block (transformers or W4A8) of a causal LM."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, W4A8MoEBlock) or (mlp is not None and hasattr(mlp, "experts") and hasattr(mlp, "gate")):
            out[i] = mlp
    return out


@torch.no_grad()
def expert_ids(block: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The top-k expert ids ``[M, k]`` the block's router picks for ``hidden_states [..., H]``."""
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    if isinstance(block, W4A8MoEBlock):
        return block.moe.route(x.to(torch.bfloat16))[1]
    return block.gate(x)[2]


@dataclass
class MoECapture:
    """Records, per MoE layer, the last forward's block input, output and expert ids."""

    keep_tensors: bool = True
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    ids: dict[int, torch.Tensor] = field(default_factory=dict)
    _handles: list = field(default_factory=list)

    def attach(self, model: nn.Module) -> "MoECapture":
        """Register the hooks on every MoE block of ``model``; returns ``self``."""
        for index, block in moe_block_modules(model).items():
            self._handles.append(block.register_forward_hook(self._hook(index)))
        return self

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            self.ids[index] = expert_ids(module, x)
            if self.keep_tensors:
                self.inputs[index] = x.detach()
                self.outputs[index] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "MoECapture":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()
