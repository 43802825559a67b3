"""Model-level helpers: tiny configs, random MoE layers, the trained test model, whole-model loading."""

from w4a8moe.models.synthetic import random_float_moe_layer, tiny_config
from w4a8moe.models.trained import tiny_trained_config, tiny_trained_model_dir, train_tiny_model

__all__ = [
    "random_float_moe_layer",
    "tiny_config",
    "tiny_trained_config",
    "tiny_trained_model_dir",
    "train_tiny_model",
]
