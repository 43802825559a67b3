"""Accuracy of W4A8 checkpoints against their source model, with baselines (``w4a8moe eval``).

Names are imported on first use (:mod:`w4a8moe._lazy`).
"""

from typing import TYPE_CHECKING

from w4a8moe._lazy import lazy_exports

_METRICS = ("kl_divergence", "next_token_nll", "perplexity", "relative_l2", "routing_overlap", "top1_agreement")
_EXPORTS = {name: "w4a8moe.eval.metrics" for name in _METRICS}
_EXPORTS.update({name: "w4a8moe.eval.run" for name in ("evaluate", "evaluate_models", "format_table", "write_plot")})
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from w4a8moe.eval.metrics import kl_divergence, next_token_nll, perplexity, relative_l2, routing_overlap, top1_agreement
    from w4a8moe.eval.run import evaluate, evaluate_models, format_table, write_plot

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
