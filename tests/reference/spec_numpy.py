"""An independent, slow implementation of SPEC sections 1-4 in numpy.

Written from the SPEC text alone (loops where the SPEC speaks per element), sharing no code
with the package, so that tests can compare the package against it.
"""

from __future__ import annotations

import numpy as np


def bf16_round(x: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (round to nearest even), returned as float32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def pack_pairs(q: np.ndarray) -> np.ndarray:
    """SPEC 4: byte [n2, k] = channel 2*n2 in the low nibble, channel 2*n2+1 in the high nibble."""
    n, k = q.shape
    out = np.zeros((n // 2, k), dtype=np.uint8)
    for n2 in range(n // 2):
        for kk in range(k):
            lo = int(q[2 * n2, kk]) & 0xF
            hi = int(q[2 * n2 + 1, kk]) & 0xF
            out[n2, kk] = lo | (hi << 4)
    return out.view(np.int8)


def unpack_pairs(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_pairs`, nibbles read as two's complement."""
    p = packed.view(np.uint8)
    n2, k = p.shape
    out = np.zeros((2 * n2, k), dtype=np.int8)
    for i in range(n2):
        for kk in range(k):
            byte = int(p[i, kk])
            for j, nib in enumerate((byte & 0xF, byte >> 4)):
                out[2 * i + j, kk] = nib - 16 if nib >= 8 else nib
    return out


def quant_weight(w: np.ndarray, qmax: int, clip: np.ndarray | float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """SPEC 1: s_n = clip_n * max_k |W[n,k]| / qmax; q = clamp(round_half_even(W/s), -qmax, qmax)."""
    w = w.astype(np.float32)
    clip = np.broadcast_to(np.asarray(clip, dtype=np.float32), (w.shape[0],))
    q = np.zeros(w.shape, dtype=np.int8)
    s = np.zeros(w.shape[0], dtype=np.float32)
    for n in range(w.shape[0]):
        amax = np.float32(np.max(np.abs(w[n]))) * clip[n]
        scale = np.float32(amax / np.float32(qmax))
        if scale == 0:
            scale = np.float32(1.0)
        s[n] = scale
        q[n] = np.clip(np.rint(w[n] / scale), -qmax, qmax).astype(np.int8)
    return q, s


def quant_rows(x: np.ndarray, alpha: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8 with an optional clip: A = alpha * max|x|, c = A / 127."""
    x = x.astype(np.float32)
    q = np.zeros(x.shape, dtype=np.int8)
    c = np.zeros((x.shape[0], 1), dtype=np.float32)
    for m in range(x.shape[0]):
        bound = np.float32(alpha) * np.float32(np.max(np.abs(x[m]))) if x.shape[1] else np.float32(0)
        scale = np.float32(bound / np.float32(127))
        c[m, 0] = scale
        if scale == 0:
            continue
        clipped = np.minimum(np.maximum(x[m], -bound), bound)
        q[m] = np.clip(np.rint(clipped / scale), -128, 127).astype(np.int8)
    return q, c


def silu_mul(gate_up: np.ndarray) -> np.ndarray:
    """SPEC 2: h = silu(g) * u in fp32, g the first half of the columns."""
    gu = gate_up.astype(np.float32)
    i = gu.shape[1] // 2
    g, u = gu[:, :i], gu[:, i:]
    return (g / (np.float32(1) + np.exp(-g))) * u


def int_matmul(xq: np.ndarray, a: np.ndarray, wq: np.ndarray, s: np.ndarray) -> np.ndarray:
    """SPEC 1: y = a_m * s_n * sum_k x_q * q, exact integer sum, product in fp32, output bf16."""
    acc = xq.astype(np.int64) @ wq.astype(np.int64).T
    assert np.abs(acc).max(initial=0) < 2**31
    y = (acc.astype(np.float32) * a.reshape(-1, 1).astype(np.float32)) * s.reshape(1, -1).astype(np.float32)
    return bf16_round(y)


def kernel_bias(q: np.ndarray, s: np.ndarray, chunks: int = 1) -> np.ndarray:
    """SPEC 4: 8 * s_n * sum_k q[n, k], as `chunks` partial sums over equal K-chunks."""
    n, k = q.shape
    out = np.zeros((n, chunks), dtype=np.float64)
    for c in range(chunks):
        part = q[:, c * (k // chunks):(c + 1) * (k // chunks)].astype(np.int64).sum(axis=1)
        out[:, c] = 8.0 * s.astype(np.float64) * part
    return out


def route_noaux_tc(logits, bias, top_k, n_group, topk_group, norm=True):
    """SPEC 3, one token at a time."""
    m, e = logits.shape
    per = e // n_group
    weights = np.zeros((m, top_k)); ids = np.zeros((m, top_k), dtype=np.int64)
    for t in range(m):
        s = 1.0 / (1.0 + np.exp(-logits[t].astype(np.float64)))
        sb = s + bias
        group_scores = [sum(sorted(sb[g * per:(g + 1) * per])[-2:]) for g in range(n_group)]
        keep = sorted(range(n_group), key=lambda g: -group_scores[g])[:topk_group]
        cand = [j for g in keep for j in range(g * per, (g + 1) * per)]
        chosen = sorted(cand, key=lambda j: -sb[j])[:top_k]
        w = np.array([s[j] for j in chosen])
        if norm:
            w = w / w.sum()
        weights[t], ids[t] = w, chosen
    return weights, ids


def route_softmax(logits, top_k, norm):
    """Softmax top-k, one token at a time."""
    m, _ = logits.shape
    weights = np.zeros((m, top_k)); ids = np.zeros((m, top_k), dtype=np.int64)
    for t in range(m):
        z = logits[t].astype(np.float64)
        p = np.exp(z - z.max()); p /= p.sum()
        chosen = list(np.argsort(-p, kind="stable")[:top_k])
        w = p[chosen]
        if norm:
            w = w / w.sum()
        weights[t], ids[t] = w, chosen
    return weights, ids


def w8a8(x: np.ndarray, wq: np.ndarray, s: np.ndarray) -> np.ndarray:
    """W8A8 dynamic Linear: per-token int8 of x, times int8 per-channel weights, bf16 out."""
    xq, a = quant_rows(x)
    return int_matmul(xq, a, wq, s)


def w8a8_mlp(x: np.ndarray, gate, up, down) -> np.ndarray:
    """SPEC 1: a W8A8 gated MLP (shared expert, dense layer); ``gate``/``up``/``down`` are (q, s).

    g and u are bf16 W8A8 outputs; h = silu(g) * u in fp32 is rounded once to bf16, then
    quantized per token for the down projection.
    """
    g = w8a8(x, *gate)
    u = w8a8(x, *up)
    with np.errstate(over="ignore"):  # exp(-g) overflows for very negative g: silu is then -0
        h = bf16_round((g / (np.float32(1) + np.exp(-g))) * u)
    return w8a8(h, *down)


def combine_rows(rows: np.ndarray, token_ids: np.ndarray, weights: np.ndarray, m: int) -> np.ndarray:
    """Per-token weighted sum of expert rows, in fp32, adding in row order onto zeros."""
    out = np.zeros((m, rows.shape[1]), dtype=np.float32)
    for r in range(rows.shape[0]):
        t = token_ids[r]
        out[t] = out[t] + rows[r].astype(np.float32) * np.float32(weights[r])
    return out


def moe_forward(x, router_w, routing, experts, alpha, shared=None, correction_bias=None, shared_gate=None):
    """A whole W4A8 MoE block, SPEC 1-3.

    ``x`` float32 (bf16 values) [M, H]; ``experts`` a list of dicts with unpacked int4 ``q13``
    [2I, H], ``s13`` [2I], ``q2`` [H, I], ``s2`` [H]; ``shared`` a dict of W8A8 (q, s) per proj.
    """
    m, h = x.shape
    logits = x.astype(np.float64) @ router_w.astype(np.float64).T
    if routing["method"] == "noaux_tc":
        w, ids = route_noaux_tc(logits, correction_bias, routing["top_k"], routing["n_group"], routing["topk_group"],
                                routing["norm"])
    else:
        w, ids = route_softmax(logits, routing["top_k"], routing["norm"])
    out = np.zeros((m, h), dtype=np.float32)
    for t in range(m):
        xq, a = quant_rows(x[t:t + 1])
        for slot in range(ids.shape[1]):
            ex = experts[ids[t, slot]]
            y1 = int_matmul(xq, a, ex["q13"], ex["s13"])
            hq, c = quant_rows(silu_mul(y1), alpha[ids[t, slot]])
            y2 = int_matmul(hq, c, ex["q2"], ex["s2"])
            out[t] += np.float32(w[t, slot]) * y2[0]
    out *= np.float32(routing["scale"])
    if shared is not None:
        shared_out = w8a8_mlp(x, shared["gate"], shared["up"], shared["down"])
        if shared_gate is not None:  # Qwen2-MoE: sigmoid gate on the shared expert, in bf16
            logit = bf16_round(x.astype(np.float32) @ shared_gate.astype(np.float32).T)
            shared_out = bf16_round(bf16_round(1 / (1 + np.exp(-logit))) * shared_out)
        out += shared_out
    return bf16_round(out)
