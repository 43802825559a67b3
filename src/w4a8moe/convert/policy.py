"""Which source tensor becomes what: W4A8 experts, W8A8 linears, or kept as they are.

Upstream default (SPEC section 1): routed experts of MoE layers are W4A8; shared experts,
dense MLPs and attention projections are W8A8 dynamic; the router, embeddings, norms,
``lm_head`` and the MLA projections upstream leaves in bf16 (``kv_a_proj_with_mqa``,
``q_a_proj``, ``kv_b_proj``) and the DeepSeek-V3.2 indexer stay in bf16.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from w4a8moe.errors import ConversionError
from w4a8moe.formats.model_config import EXPERT_PROJECTIONS, MoEModelConfig

W4A8_EXPERT = "w4a8_expert"
W8A8 = "w8a8"
KEEP = "keep"

DEFAULT_KEEP_BF16 = (
    r"\.kv_a_proj_with_mqa$",
    r"\.q_a_proj$",
    r"\.kv_b_proj$",
    r"\.indexer\.",
)
"""Module-name regexes (``re.search`` on the name without ``.weight``) kept in bf16 by default."""
ALWAYS_KEPT = (
    r"(^|\.)embed_tokens$",
    r"(^|\.)lm_head$",
    r"\.shared_head\.head$",
    r"\.shared_expert_gate$",
)
"""Never quantized whatever the patterns say: embeddings, output heads, gates (routers are
added per family, see :class:`LayerPolicy`)."""


@dataclass
class LayerPolicy:
    """Classifies source tensors; ``keep_bf16`` regexes name extra modules to leave unquantized."""

    model_config: MoEModelConfig
    keep_bf16: tuple[str, ...] = DEFAULT_KEEP_BF16

    def __post_init__(self) -> None:
        names = self.model_config.names
        router = rf"\.{re.escape(names.block)}\.{re.escape(names.router)}$"
        try:
            self._keep = [re.compile(p) for p in self.keep_bf16]
        except re.error as exc:
            raise ConversionError(f"keep-bf16 pattern is not a valid regex: {exc}") from exc
        self._always = [re.compile(p) for p in ALWAYS_KEPT + (router,)]
        self._expert = re.compile(
            rf"^model\.layers\.(\d+)\.{re.escape(names.block)}\.{re.escape(names.experts)}\.(\d+)\."
            rf"({'|'.join(re.escape(p) for p in names.expert_proj)})\.weight$"
        )

    def kept_by_pattern(self, module: str) -> bool:
        """True when ``module`` (a name without ``.weight``) matches a keep-bf16 pattern."""
        return any(p.search(module) for p in self._keep)

    def expert_of(self, name: str) -> tuple[int, int, str] | None:
        """``(layer, expert, proj)`` of a routed-expert weight name (proj in gate/up/down), else ``None``."""
        m = self._expert.match(name)
        if not m:
            return None
        proj = EXPERT_PROJECTIONS[self.model_config.names.expert_proj.index(m.group(3))]
        return int(m.group(1)), int(m.group(2)), proj

    def w4a8_layer(self, layer: int, has_experts: bool) -> bool:
        """Whether the routed experts of ``layer`` become W4A8 (all or none: a checkpoint can't mix)."""
        if not has_experts:
            return False
        mc = self.model_config
        kept = [
            self.kept_by_pattern(mc.names.expert_weight(layer, e, p))
            for e in range(mc.num_experts) for p in EXPERT_PROJECTIONS
        ]
        if any(kept) and not all(kept):
            raise ConversionError(
                f"keep-bf16 patterns {list(self.keep_bf16)} match some but not all routed experts of layer {layer}; "
                "a MoE layer's experts are either all W4A8 or all kept"
            )
        return not all(kept)

    def classify(self, name: str, ndim: int) -> str:
        """``W8A8`` or ``KEEP`` for a tensor outside the W4A8 MoE blocks."""
        if not name.endswith(".weight") or ndim != 2:
            return KEEP  # norms, biases, correction biases, scales
        module = name[: -len(".weight")]
        if any(p.search(module) for p in self._always) or self.kept_by_pattern(module):
            return KEEP
        if not module.startswith("model.layers."):
            return KEEP  # outside the decoder layers only embeddings/heads live
        return W8A8

    def describe(self) -> dict:
        """The policy as recorded in the output config."""
        return {
            "routed_experts": "W4A8 (int4 per-channel weights with learned clip, int8 per-token activations)",
            "other_linears": "W8A8 dynamic (int8 per-channel weights, int8 per-token activations)",
            "keep_bf16_patterns": list(self.keep_bf16),
            "always_kept": list(ALWAYS_KEPT) + ["router (<block>.<router>)", "norms", "biases"],
        }
