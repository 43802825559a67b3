"""Model-level helpers: tiny configs, random MoE layers, the trained test model, whole-model loading.

Names are imported on first use (:mod:`w4a8moe._lazy`).
"""

from typing import TYPE_CHECKING

from w4a8moe._lazy import lazy_exports

_EXPORTS = {
    "export_w4a8_checkpoint": "w4a8moe.models.export",
    "W4A8MoEBlock": "w4a8moe.models.loading",
    "load_model": "w4a8moe.models.loading",
    "random_float_moe_layer": "w4a8moe.models.synthetic",
    "tiny_config": "w4a8moe.models.synthetic",
    "tiny_trained_config": "w4a8moe.models.trained",
    "tiny_trained_model_dir": "w4a8moe.models.trained",
    "train_tiny_model": "w4a8moe.models.trained",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from w4a8moe.models.export import export_w4a8_checkpoint
    from w4a8moe.models.loading import W4A8MoEBlock, load_model
    from w4a8moe.models.synthetic import random_float_moe_layer, tiny_config
    from w4a8moe.models.trained import tiny_trained_config, tiny_trained_model_dir, train_tiny_model

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
