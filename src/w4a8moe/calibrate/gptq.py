"""GPTQ with act-order for int4 per-channel weights whose scales are already chosen.

After the clip search has fixed each output channel's scale ``s_n``, GPTQ (Frantar et al.,
2022) picks the integer values column by column, spreading each column's rounding error over
the columns not yet quantized so as to minimise ``||X W^T - X Q^T||^2`` on the calibration
inputs ``X``. Columns go in order of decreasing Hessian diagonal ("act-order"). The scales are
not changed, so the stored weight is still ``q * s`` with ``q`` in [-7, 7].
"""

from __future__ import annotations

import torch

from w4a8moe.quant import INT4_MAX

GPTQ_BLOCK = 128
GPTQ_DAMP = 0.01


def _round_to_scale(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # The element quantizer of SPEC 1 (quantize_int4_per_channel) with the scale given rather
    # than derived from the row maximum, which GPTQ's error feedback must not move.
    return torch.clamp(torch.round(w / scale), -INT4_MAX, INT4_MAX)


def gptq_int4(weight: torch.Tensor, scale: torch.Tensor, inputs: torch.Tensor, damp: float = GPTQ_DAMP,
              block: int = GPTQ_BLOCK) -> torch.Tensor:
    """Integer values ``q`` (int8 ``[N, K]``) for ``weight`` ``[N, K]`` under fixed ``scale`` ``[N]``.

    ``inputs`` ``[M, K]`` are the rows this projection sees (in the quantized model: the
    dequantized int8 activations). ``damp`` adds that fraction of the mean Hessian diagonal.
    Input columns that are always zero get ``q = 0``.
    """
    w = weight.to(torch.float64).clone()
    s = scale.to(torch.float64).reshape(-1, 1)
    x = inputs.to(torch.float64)
    n, k = w.shape
    hessian = 2.0 * x.T @ x / max(1, x.shape[0])
    dead = torch.diagonal(hessian) == 0
    hessian[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
    w = w[:, perm]
    hessian = hessian[perm][:, perm]
    hessian += damp * torch.diagonal(hessian).mean() * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    q = torch.zeros_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i : i + 1]
            qi = _round_to_scale(col, s)
            q[:, i1 + i : i1 + i + 1] = qi
            e = (col - qi * s) / h1[i, i]
            w1[:, i:] -= e @ h1[i : i + 1, i:]
            err1[:, i : i + 1] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q[:, torch.argsort(perm)].to(torch.int8)
