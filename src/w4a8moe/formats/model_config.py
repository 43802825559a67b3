"""Model hyper-parameters from ``config.json`` and the tensor names of each MoE family.

DeepSeek-V3 names are the reference; Qwen2-MoE, Qwen3-MoE, Mixtral and OLMoE differ in
key names, routing and where the MoE block lives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from w4a8moe.errors import ConfigError

EXPERT_PROJECTIONS = ("gate", "up", "down")
"""The three matmuls of one expert, in the order gate (w1), up (w3), down (w2)."""


@dataclass(frozen=True)
class RoutingConfig:
    """How a router turns logits into ``(weights, expert ids)``.

    ``method`` is ``"noaux_tc"`` (sigmoid scores, group-limited, bias-corrected choice) or
    ``"softmax"`` (Qwen-MoE, Mixtral, OLMoE).
    """

    method: str
    num_experts: int
    top_k: int
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in ("noaux_tc", "softmax"):
            raise ValueError(f"unknown routing method {self.method!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must lie in [1, num_experts={self.num_experts}]")
        if self.method == "noaux_tc":
            if self.num_experts % self.n_group:
                raise ValueError(f"num_experts={self.num_experts} not divisible by n_group={self.n_group}")
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"topk_group={self.topk_group} must lie in [1, n_group={self.n_group}]")
            per_group = self.num_experts // self.n_group
            if self.top_k > self.topk_group * per_group:
                raise ValueError("top_k exceeds the experts in the kept groups")


@dataclass(frozen=True)
class MoENames:
    """Where a family keeps a MoE block's tensors, relative to ``model.layers.L.``."""

    block: str = "mlp"
    router: str = "gate"
    experts: str = "experts"
    expert_proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared: str | None = None
    shared_gate: str | None = None

    def layer_prefix(self, layer: int) -> str:
        """``model.layers.L.<block>``."""
        return f"model.layers.{layer}.{self.block}"

    def expert_weight(self, layer: int, expert: int, proj: str) -> str:
        """Name prefix of one expert projection (``proj`` in gate/up/down), without ``.weight``."""
        idx = EXPERT_PROJECTIONS.index(proj)
        return f"{self.layer_prefix(layer)}.{self.experts}.{expert}.{self.expert_proj[idx]}"

    def shared_weight(self, layer: int, proj: str) -> str:
        """Name prefix of one shared-expert projection, without ``.weight``."""
        if self.shared is None:
            raise ConfigError("this model family has no shared expert")
        return f"{self.layer_prefix(layer)}.{self.shared}.{proj}_proj"


_DEEPSEEK = MoENames(shared="shared_experts")
_QWEN2 = MoENames(shared="shared_expert", shared_gate="shared_expert_gate")
_PLAIN = MoENames()
_MIXTRAL = MoENames(block="block_sparse_moe", expert_proj=("w1", "w3", "w2"))


def _require(config: dict, key: str, where: str, *aliases: str):
    """``config[key]`` (or the first alias present, for names that differ between releases)."""
    for name in (key, *aliases):
        if name in config:
            return config[name]
    also = f" (or {', '.join(repr(a) for a in aliases)})" if aliases else ""
    raise ConfigError(f"config.json: {where} model needs key {key!r}{also}")


@dataclass(frozen=True)
class MoEModelConfig:
    """The MoE-relevant hyper-parameters of one model, in DeepSeek-V3 terms."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_experts: int
    moe_intermediate_size: int
    shared_intermediate_size: int
    routing: RoutingConfig
    names: MoENames
    expected_moe_layers: tuple[int, ...] = field(default=())

    @property
    def top_k(self) -> int:
        """Experts chosen per token."""
        return self.routing.top_k

    @classmethod
    def from_dict(cls, config: dict) -> "MoEModelConfig":
        """Parse a ``config.json`` dict; raise :class:`ConfigError` on a missing or bad key."""
        model_type = config.get("model_type")
        if model_type is None:
            raise ConfigError("config.json has no 'model_type'")
        hidden = int(_require(config, "hidden_size", model_type))
        layers = int(_require(config, "num_hidden_layers", model_type))
        if model_type in ("deepseek_v3", "deepseek_v32", "deepseek_v2", "kimi_k2"):
            e = int(_require(config, "n_routed_experts", model_type))
            inter = int(_require(config, "moe_intermediate_size", model_type))
            n_shared = int(config.get("n_shared_experts") or 0)
            topk_method = config.get("topk_method", "noaux_tc")
            if topk_method != "noaux_tc":
                raise ConfigError(f"config.json: topk_method {topk_method!r} is not supported (only 'noaux_tc')")
            if config.get("scoring_func", "sigmoid") != "sigmoid":
                raise ConfigError(f"config.json: scoring_func {config.get('scoring_func')!r}; noaux_tc needs 'sigmoid'")
            routing = RoutingConfig(
                method="noaux_tc",
                num_experts=e,
                top_k=int(_require(config, "num_experts_per_tok", model_type)),
                n_group=int(config.get("n_group") or 1),
                topk_group=int(config.get("topk_group") or 1),
                norm_topk_prob=bool(config.get("norm_topk_prob", True)),
                routed_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
            )
            first_dense = int(config.get("first_k_dense_replace", 0))
            freq = int(config.get("moe_layer_freq", 1))
            expected = tuple(i for i in range(layers) if i >= first_dense and i % freq == 0)
            return cls(model_type, hidden, layers, e, inter, n_shared * inter, routing, _DEEPSEEK, expected)
        if model_type in ("qwen2_moe", "qwen3_moe"):
            # transformers 5 writes Qwen3-MoE's expert count as num_local_experts; hub configs say num_experts
            e = int(_require(config, "num_experts", model_type, "num_local_experts"))
            inter = int(_require(config, "moe_intermediate_size", model_type))
            shared = int(config.get("shared_expert_intermediate_size") or 0) if model_type == "qwen2_moe" else 0
            step = int(config.get("decoder_sparse_step", 1) or 1)
            dense = set(config.get("mlp_only_layers") or [])
            expected = tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0)
            routing = RoutingConfig(
                "softmax", e, int(_require(config, "num_experts_per_tok", model_type)),
                norm_topk_prob=bool(config.get("norm_topk_prob", model_type == "qwen3_moe")),
            )
            names = _QWEN2 if shared else _PLAIN
            return cls(model_type, hidden, layers, e, inter, shared, routing, names, expected)
        if model_type == "mixtral":
            e = int(_require(config, "num_local_experts", model_type))
            inter = int(_require(config, "intermediate_size", model_type))
            routing = RoutingConfig("softmax", e, int(_require(config, "num_experts_per_tok", model_type)), norm_topk_prob=True)
            return cls(model_type, hidden, layers, e, inter, 0, routing, _MIXTRAL, tuple(range(layers)))
        if model_type == "olmoe":
            e = int(_require(config, "num_experts", model_type))
            inter = int(_require(config, "intermediate_size", model_type))
            routing = RoutingConfig(
                "softmax", e, int(_require(config, "num_experts_per_tok", model_type)),
                norm_topk_prob=bool(config.get("norm_topk_prob", False)),
            )
            return cls(model_type, hidden, layers, e, inter, 0, routing, _PLAIN, tuple(range(layers)))
        raise ConfigError(
            f"config.json: model_type {model_type!r} is not a supported MoE family "
            "(deepseek_v3, deepseek_v2, qwen2_moe, qwen3_moe, mixtral, olmoe)"
        )

    def projection_shape(self, proj: str) -> tuple[int, int]:
        """Unpacked ``(N, K)`` of a routed expert projection."""
        if proj == "down":
            return self.hidden_size, self.moe_intermediate_size
        return self.moe_intermediate_size, self.hidden_size

    def shared_projection_shape(self, proj: str) -> tuple[int, int]:
        """``(N, K)`` of a shared-expert projection."""
        if proj == "down":
            return self.hidden_size, self.shared_intermediate_size
        return self.shared_intermediate_size, self.hidden_size
