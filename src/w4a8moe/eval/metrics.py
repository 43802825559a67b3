"""Accuracy metrics of a quantized model against its source, as plain tensor functions.

Every function takes per-token tensors and returns sums or counts, so that callers can
accumulate over batches and divide once (:class:`RunningMean`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood (nats) of each next token: logits ``[B, S, V]``, ids ``[B, S]``.

    Position ``t`` predicts token ``t + 1``; returns fp32 ``[B, S - 1]``.
    """
    logp = torch.log_softmax(logits[:, :-1].to(torch.float32), dim=-1)
    return -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def perplexity(mean_nll: float) -> float:
    """``exp(mean NLL)``."""
    return math.exp(mean_nll)


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(P_ref || P)`` (nats) of the next-token distributions at each position, ``[...]``.

    ``P_ref`` is the source model's softmax; computed in fp32 from log-probabilities, so a
    distribution compared with itself gives exactly 0.
    """
    ref_logp = torch.log_softmax(ref_logits.to(torch.float32), dim=-1)
    logp = torch.log_softmax(logits.to(torch.float32), dim=-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1)


def top1_agreement(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """1.0 where the two models' most likely next token is the same, else 0.0, ``[...]``."""
    return (ref_logits.argmax(dim=-1) == logits.argmax(dim=-1)).to(torch.float32)


def squared_error_sums(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """``(sum |out - ref|^2, sum |ref|^2)`` in fp64, the parts of a relative L2 error."""
    o = out.to(torch.float64)
    r = ref.to(torch.float64)
    return float(((o - r) ** 2).sum()), float((r**2).sum())


def relative_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` over all elements (0 when both are 0)."""
    err, norm = squared_error_sums(out, ref)
    return math.sqrt(err / norm) if norm > 0 else (0.0 if err == 0 else math.inf)


def routing_overlap(ref_ids: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per token, the fraction of the reference's top-k experts the model also chose, ``[M]``.

    ``ref_ids`` and ``ids`` are int ``[M, k]``; order within the top-k does not matter.
    """
    if ref_ids.shape != ids.shape:
        raise ValueError(f"routing ids differ in shape: {tuple(ref_ids.shape)} vs {tuple(ids.shape)}")
    match = (ref_ids.unsqueeze(-1) == ids.unsqueeze(-2)).any(dim=-1)  # [M, k]
    return match.to(torch.float32).mean(dim=-1)


@dataclass
class RunningMean:
    """Sum and count of a per-token quantity, accumulated over batches."""

    total: float = 0.0
    count: int = 0

    def add(self, values: torch.Tensor) -> None:
        """Add every element of ``values``."""
        self.total += float(values.to(torch.float64).sum())
        self.count += values.numel()

    @property
    def mean(self) -> float:
        """The mean so far (NaN before anything was added)."""
        return self.total / self.count if self.count else math.nan


@dataclass
class RunningRelativeL2:
    """``sqrt(sum err^2 / sum ref^2)`` accumulated over batches."""

    err: float = 0.0
    norm: float = 0.0

    def add(self, out: torch.Tensor, ref: torch.Tensor) -> None:
        e, n = squared_error_sums(out, ref)
        self.err += e
        self.norm += n

    @property
    def value(self) -> float:
        if self.norm == 0:
            return 0.0 if self.err == 0 else math.inf
        return math.sqrt(self.err / self.norm)
