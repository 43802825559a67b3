"""Model-level helpers: tiny model configs and random MoE layers for demos and tests."""

from w4a8moe.models.synthetic import random_float_moe_layer, tiny_config

__all__ = ["random_float_moe_layer", "tiny_config"]
