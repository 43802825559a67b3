"""Small model configs of each supported family and random MoE layers built from them.

Used by the demo and the tests; nothing is downloaded.
"""

from __future__ import annotations

import torch

from w4a8moe.formats.layer_tensors import FloatMoELayer
from w4a8moe.formats.model_config import EXPERT_PROJECTIONS, MoEModelConfig


def tiny_config(model_type: str = "deepseek_v3", **overrides) -> dict:
    """A ``config.json`` dict of a small model of ``model_type`` (DeepSeek-V3 shaped by default)."""
    base = {"hidden_size": 64, "num_hidden_layers": 3, "vocab_size": 256, "num_attention_heads": 4,
            "num_key_value_heads": 4, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
            "torch_dtype": "bfloat16"}
    if model_type == "deepseek_v3":
        cfg = dict(base, model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], n_routed_experts=8,
                   num_experts_per_tok=4, n_group=4, topk_group=2, moe_intermediate_size=32, intermediate_size=128,
                   n_shared_experts=1, first_k_dense_replace=1, moe_layer_freq=1, routed_scaling_factor=2.5,
                   norm_topk_prob=True, topk_method="noaux_tc", scoring_func="sigmoid", q_lora_rank=None,
                   kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    elif model_type == "qwen2_moe":
        cfg = dict(base, model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], num_experts=8,
                   num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                   intermediate_size=128, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[])
    elif model_type == "qwen3_moe":
        cfg = dict(base, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], num_experts=8,
                   num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=128, norm_topk_prob=True,
                   decoder_sparse_step=1, mlp_only_layers=[], head_dim=16)
    elif model_type == "mixtral":
        cfg = dict(base, model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=4,
                   num_experts_per_tok=2, intermediate_size=32)
    elif model_type == "olmoe":
        cfg = dict(base, model_type="olmoe", architectures=["OlmoeForCausalLM"], num_experts=8,
                   num_experts_per_tok=2, intermediate_size=32, norm_topk_prob=False)
    else:
        raise ValueError(f"no tiny config for {model_type!r}")
    cfg.update(overrides)
    return cfg


def random_float_moe_layer(config: dict, seed: int = 0, outliers: bool = True,
                           alpha: torch.Tensor | None = None) -> FloatMoELayer:
    """A random float MoE block shaped by ``config``.

    With ``outliers`` a few weight columns are scaled up, as in real models, so that the
    weight clip and per-channel scales matter.
    """
    mc = MoEModelConfig.from_dict(config)
    gen = torch.Generator().manual_seed(seed)
    e, h = mc.num_experts, mc.hidden_size

    def rand(*shape: int) -> torch.Tensor:
        w = torch.randn(*shape, generator=gen) / shape[-1] ** 0.5
        if outliers:
            cols = torch.randint(0, shape[-1], (max(1, shape[-1] // 32),), generator=gen)
            w[..., cols] *= 3.0
        return w

    experts = {}
    for proj in EXPERT_PROJECTIONS:
        n, k = mc.projection_shape(proj)
        experts[proj] = rand(e, n, k)
    shared = None
    if mc.shared_intermediate_size:
        shared = {proj: rand(*mc.shared_projection_shape(proj)) for proj in EXPERT_PROJECTIONS}
    return FloatMoELayer(
        router_weight=rand(e, h).to(torch.bfloat16),
        experts=experts,
        correction_bias=(0.1 * torch.randn(e, generator=gen)) if mc.routing.method == "noaux_tc" else None,
        shared=shared,
        shared_expert_gate=rand(1, h).to(torch.bfloat16) if mc.names.shared_gate and shared else None,
        alpha=alpha,
    )
