"""The Triton kernels of the ``triton`` backend (imported only when that backend runs).

Every kernel follows the fp32 operation order of :mod:`w4a8moe.quant` so that the results
are the reference's bits: int32 accumulation with ``tl.dot`` on int8, ``(acc * a_m) * s_n``
then round-to-nearest-even to bf16 (in integer arithmetic), IEEE division (``div_rn``; plain ``/`` is approximate on
NVIDIA GPUs), round-half-even by the ``1.5 * 2**23`` trick (exact for ``|v| < 2**22``, and
every quotient here is at most ~128 in magnitude), and a weighted sum in increasing row order.
Launches pass ``enable_fp_fusion=False`` so that no multiply-add is contracted into an FMA.

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the same kernels run on
CPU tensors: that is how CI tests them.
"""

from __future__ import annotations

import triton
import triton.language as tl

ROUND_MAGIC = 12582912.0  # 1.5 * 2**23: v + M - M rounds v to an integer, half to even, in fp32


@triton.jit
def _to_bf16_rne(y):
    """fp32 to bf16, round to nearest even, NaN to 0x7FC0: torch's conversion, in integer
    arithmetic (the interpreter's own ``.to(tl.bfloat16)`` truncates; the GPU's rounds)."""
    bits = y.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(y != y, 0x7FC0, rounded)
    return rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def grouped_gemm_kernel(
    a_ptr, a_scale_ptr, a_row_ptr, w_ptr, w_scale_ptr, out_ptr,
    tile_expert_ptr, tile_row_ptr, expert_end_ptr,
    N, K, stride_a,
    GATHER: tl.constexpr, INT4: tl.constexpr, RAW_INT32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One ``BLOCK_M`` rows x ``2 * BLOCK_P`` channels tile of one expert's GEMM.

    Rows ``tile_row[t] ..`` (below ``expert_end[e]``) of A (int8, row stride ``stride_a``; with
    ``GATHER`` row ``r`` reads A row ``a_row[r]`` and its scale) times expert ``e``'s weight.
    ``INT4``: ``w`` is packed int8 ``[E, N/2, K]`` (channel ``2p`` in the low nibble of byte
    row ``p``, ``2p + 1`` in the high one), unpacked here in registers into two int8 dots, one
    for the even and one for the odd channels. Otherwise ``w`` is plain int8 ``[E, N, K]`` and
    the "pairs" are channels ``p`` and ``p + BLOCK_P`` of a ``2 * BLOCK_P`` tile. Output: bf16
    ``(float(acc) * a_m) * s_n``, or with ``RAW_INT32`` the int32 ``acc`` itself (no scales).
    """
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_t)
    if e >= 0:  # tiles past the last real one (the grid is an upper bound) do nothing
        e64 = e.to(tl.int64)
        row_start = tl.load(tile_row_ptr + pid_t).to(tl.int64)
        row_end = tl.load(expert_end_ptr + e).to(tl.int64)
        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        if GATHER:
            src = tl.load(a_row_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            src = rows
        if INT4:
            pairs = pid_n * BLOCK_P + tl.arange(0, BLOCK_P)
            ch_lo = 2 * pairs
            ch_hi = 2 * pairs + 1
            pair_mask = pairs < N // 2
            w_rows = pairs
            w_base = w_ptr + e64 * (N // 2) * K
        else:
            ch_lo = pid_n * 2 * BLOCK_P + tl.arange(0, BLOCK_P)
            ch_hi = ch_lo + BLOCK_P
            pair_mask = ch_lo < N
            w_rows = ch_lo
            w_base = w_ptr + e64 * N * K
        hi_mask = ch_hi < N
        acc_lo = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.int32)
        acc_hi = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < K
            a = tl.load(a_ptr + src[:, None] * stride_a + ks[None, :],
                        mask=row_mask[:, None] & k_mask[None, :], other=0)
            if INT4:
                b = tl.load(w_base + w_rows[:, None].to(tl.int64) * K + ks[None, :],
                            mask=pair_mask[:, None] & k_mask[None, :], other=0)
                # Sign-extend each nibble: shift it to the top of an int32, shift back arithmetically.
                b32 = b.to(tl.int32)
                lo = ((b32 << 28) >> 28).to(tl.int8)
                hi = (b32 >> 4).to(tl.int8)
            else:
                lo = tl.load(w_base + ch_lo[:, None].to(tl.int64) * K + ks[None, :],
                             mask=pair_mask[:, None] & k_mask[None, :], other=0)
                hi = tl.load(w_base + ch_hi[:, None].to(tl.int64) * K + ks[None, :],
                             mask=hi_mask[:, None] & k_mask[None, :], other=0)
            acc_lo = tl.dot(a, tl.trans(lo), acc_lo, out_dtype=tl.int32)
            acc_hi = tl.dot(a, tl.trans(hi), acc_hi, out_dtype=tl.int32)
        out_lo = out_ptr + rows[:, None] * N + ch_lo[None, :]
        out_hi = out_ptr + rows[:, None] * N + ch_hi[None, :]
        mask_lo = row_mask[:, None] & pair_mask[None, :]
        mask_hi = row_mask[:, None] & hi_mask[None, :]
        if RAW_INT32:
            tl.store(out_lo, acc_lo, mask=mask_lo)
            tl.store(out_hi, acc_hi, mask=mask_hi)
        else:
            a_scale = tl.load(a_scale_ptr + src, mask=row_mask, other=0.0)
            s_lo = tl.load(w_scale_ptr + e64 * N + ch_lo, mask=pair_mask, other=0.0)
            s_hi = tl.load(w_scale_ptr + e64 * N + ch_hi, mask=hi_mask, other=0.0)
            y_lo = acc_lo.to(tl.float32) * a_scale[:, None] * s_lo[None, :]
            y_hi = acc_hi.to(tl.float32) * a_scale[:, None] * s_hi[None, :]
            tl.store(out_lo, _to_bf16_rne(y_lo), mask=mask_lo)
            tl.store(out_hi, _to_bf16_rne(y_hi), mask=mask_hi)


@triton.jit
def _quantize_row(v, safe):
    """``clamp(round_half_even(v / safe), -128, 127)`` as int8 (NaN to 0)."""
    q = tl.math.div_rn(v, safe)
    q = (q + 12582912.0) - 12582912.0
    # NaN (a row whose bound overflowed to inf) becomes 0, as torch's CPU cast of NaN does.
    q = tl.where(q == q, q, 0.0)
    q = tl.minimum(tl.maximum(q, -128.0), 127.0)
    return q.to(tl.int8)


@triton.jit
def quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, K, BLOCK: tl.constexpr):
    """:func:`w4a8moe.quant.dynamic_quant_per_token` of one row (bf16 or fp32 in)."""
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * K
    amax = 0.0
    for j0 in range(0, K, BLOCK):
        js = j0 + tl.arange(0, BLOCK)
        x = tl.load(base + js, mask=js < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
    scale = tl.math.div_rn(amax, 127.0)
    safe = tl.where(scale > 0, scale, 1.0)
    for j0 in range(0, K, BLOCK):
        js = j0 + tl.arange(0, BLOCK)
        x = tl.load(base + js, mask=js < K, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * K + js, _quantize_row(x, safe), mask=js < K)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _swiglu_chunk(gu_ptr, silu_ptr, row, js, I, scalar_from):
    """``h = silu(g) * u`` for columns ``js`` of one row of the bf16 GMM1 output.

    ``silu`` is read from a table of torch's own fp32 silu of every bf16 value: entries
    ``[0, 65536)`` from its vector code, ``[65536, 131072)`` from its scalar code, which torch
    uses for the columns from ``scalar_from`` on (a row's tail past its last whole vector).
    """
    m = js < I
    g = tl.load(gu_ptr + row * 2 * I + js, mask=m, other=0.0)
    u = tl.load(gu_ptr + row * 2 * I + I + js, mask=m, other=0.0)
    bits = g.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    bits = tl.where(js >= scalar_from, bits + 65536, bits)
    return tl.load(silu_ptr + bits, mask=m, other=0.0) * u.to(tl.float32)


@triton.jit
def swiglu_clip_quant_kernel(gu_ptr, alpha_ptr, row_expert_ptr, silu_ptr, hq_ptr, hscale_ptr, I, scalar_from,
                             BLOCK: tl.constexpr):
    """SPEC 2 for one row: ``A = alpha_e * max_j |h_j|`` over the whole row, ``h~ = clamp(h,
    -A, A)``, ``c = A / 127``, ``h_q = round(h~ / c)``. ``h`` is recomputed in the second pass
    rather than kept (it is a table read and a multiply)."""
    row = tl.program_id(0).to(tl.int64)
    alpha = tl.load(alpha_ptr + tl.load(row_expert_ptr + row))
    amax = 0.0
    for j0 in range(0, I, BLOCK):
        js = j0 + tl.arange(0, BLOCK)
        h = _swiglu_chunk(gu_ptr, silu_ptr, row, js, I, scalar_from)
        amax = tl.maximum(amax, tl.max(tl.abs(h), axis=0))
    bound = alpha * amax
    scale = tl.math.div_rn(bound, 127.0)
    safe = tl.where(scale > 0, scale, 1.0)
    for j0 in range(0, I, BLOCK):
        js = j0 + tl.arange(0, BLOCK)
        h = _swiglu_chunk(gu_ptr, silu_ptr, row, js, I, scalar_from)
        clipped = tl.minimum(tl.maximum(h, -bound), bound)
        tl.store(hq_ptr + row * I + js, _quantize_row(clipped, safe), mask=js < I)
    tl.store(hscale_ptr + row, scale)


@triton.jit
def combine_kernel(rows_ptr, weight_ptr, token_rows_ptr, token_start_ptr, out_ptr, H, BLOCK_H: tl.constexpr):
    """``out[t] = sum_r w_r * float(rows[r])`` over token ``t``'s rows in increasing ``r``,
    onto zeros: the order of :func:`w4a8moe.kernels.base.combine_rows`, no atomics."""
    t = tl.program_id(0).to(tl.int64)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = hs < H
    start = tl.load(token_start_ptr + t)
    end = tl.load(token_start_ptr + t + 1)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for i in range(start, end):
        r = tl.load(token_rows_ptr + i).to(tl.int64)
        w = tl.load(weight_ptr + r)
        v = tl.load(rows_ptr + r * H + hs, mask=m, other=0.0).to(tl.float32)
        acc += v * w
    tl.store(out_ptr + t * H + hs, acc, mask=m)
