"""Accuracy of W4A8 checkpoints against their source model, with baselines (``w4a8moe eval``)."""

from w4a8moe.eval.metrics import kl_divergence, next_token_nll, perplexity, relative_l2, routing_overlap, top1_agreement
from w4a8moe.eval.run import evaluate, evaluate_models, format_table, write_plot

__all__ = [
    "evaluate",
    "evaluate_models",
    "format_table",
    "kl_divergence",
    "next_token_nll",
    "perplexity",
    "relative_l2",
    "routing_overlap",
    "top1_agreement",
    "write_plot",
]
