"""vLLM plugin: serves W4A8 checkpoints of both formats on the project's kernels.

Registered through the ``vllm.general_plugins`` entry point (see ``pyproject.toml``), so
installing the package with the ``vllm`` extra is all it takes; vLLM calls :func:`register`
in its front end, its engine core and every worker. vLLM is imported only inside this
package.
"""

from __future__ import annotations

_REGISTERED = False


def register() -> None:
    """Register the ``w4a8moe`` quantization config and the plugin's custom ops (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config

    from w4a8moe.integrations.vllm import ops  # noqa: F401  (registers the torch custom ops)
    from w4a8moe.integrations.vllm.config import NAME, W4A8MoEConfig

    register_quantization_config(NAME)(W4A8MoEConfig)
    _REGISTERED = True
