"""Model-level helpers: tiny configs, random MoE layers, the trained test model, whole-model loading."""

from w4a8moe.models.export import export_w4a8_checkpoint
from w4a8moe.models.loading import W4A8MoEBlock, load_model
from w4a8moe.models.synthetic import random_float_moe_layer, tiny_config
from w4a8moe.models.trained import tiny_trained_config, tiny_trained_model_dir, train_tiny_model

__all__ = [
    "W4A8MoEBlock",
    "export_w4a8_checkpoint",
    "load_model",
    "random_float_moe_layer",
    "tiny_config",
    "tiny_trained_config",
    "tiny_trained_model_dir",
    "train_tiny_model",
]
