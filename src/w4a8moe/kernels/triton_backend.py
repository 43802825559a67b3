"""The ``triton`` backend: the grouped W4A8 expert path on NVIDIA GPUs, in Triton.

Chosen automatically for CUDA tensors (where ``triton`` is installed). The same kernels run
on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is first
imported, as ``tests/conftest.py`` does), which is how CI tests them; on CPU they are only
used when named (``backend="triton"``).

The routed rows arrive sorted by expert (``expert_offsets``); a tile schedule built on the
device, without a host synchronisation, maps each program to one ``BLOCK_M``-row tile of one
expert, so empty experts cost nothing and the weights of idle experts are never read.

- GMM1: packed int4 ``w13`` (as on disk, 4 bits per weight: the SPEC-4 layout is already the
  K-contiguous byte rows the kernel loads, so :meth:`TritonBackend.prepare` re-lays nothing),
  unpacked in registers, times the int8 token rows gathered by ``token_ids``; exact int32
  ``tl.dot``; bf16 output ``(acc * a_m) * s_n``.
- SwiGLU-clip-quant (SPEC 2), one program per row over the whole ``I``; ``silu`` is read from
  the table of torch's own fp32 silu of every bf16 value (the CPU backend's
  :func:`~w4a8moe.kernels.cpu.silu_tables`), so ``h`` is the reference's bits, not a GPU
  ``exp``'s.
- GMM2 like GMM1, on the int8 ``h_q`` rows, bf16 rows out.
- The per-token weighted sum in increasing row order, in fp32 without FMA contraction or
  atomics: the bits of :func:`~w4a8moe.kernels.base.combine_rows`, the same run to run.

Where the reference's silu ran a row in more than one thread chunk (large ``R * I`` on a
multi-core CPU), torch's scalar-tail columns fall elsewhere than this backend assumes (the
row's end) and single ``h`` values may be 1 ulp apart; everything else is bit-identical.
W8A8 Linears and :meth:`TritonBackend.int_matmul` run ``torch._int_mm`` (cuBLAS, exact int32)
on CUDA, zero-padded to its shape rules, and the Triton int8 GEMM on CPU tensors.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from w4a8moe.kernels.base import PackedExpertWeights, PreparedExperts, register_backend
from w4a8moe.kernels.cuda_int_mm import int_mm_padded, pad_weight_for_int_mm
from w4a8moe.quant import dynamic_quant_per_token
from w4a8moe.quant.matmul import scale_int32

INTERPRET_ENV = "TRITON_INTERPRET"
INT32_SAFE_K = 65536
"""Largest K whose int8 x int8 sums cannot overflow int32 (``K * 128 * 128 < 2**31``)."""


def triton_available() -> bool:
    """Whether the ``triton`` package imports here."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``), on CPU tensors."""
    return os.environ.get(INTERPRET_ENV, "0") == "1"


def _interpreter_active() -> bool:
    """Whether triton itself was imported in interpreter mode (it reads the flag at import:
    ``tl.max`` is then an interpreted function, else one compiled for a GPU)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.max, InterpretedFunction)


def _kernels():
    # Imported at first use: triton is optional, and the interpreter flag is read at import.
    from w4a8moe.kernels import _triton_kernels

    return _triton_kernels


@dataclass(frozen=True)
class GemmConfig:
    """Tile sizes of the grouped GEMM: rows, channel *pairs* (2 channels each) and K per step."""

    block_m: int
    block_p: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def default_gemm_config(rows: int, num_experts: int) -> GemmConfig:
    """Tiles for ``rows`` routed rows over ``num_experts``: small row tiles for decode (few
    rows per expert, the weights stream once), large ones for prefill (reuse of each weight tile)."""
    per_expert = rows / max(num_experts, 1)
    if per_expert <= 16:
        return GemmConfig(16, 64, 256, num_warps=4, num_stages=4)
    if per_expert <= 32:
        return GemmConfig(32, 64, 256, num_warps=4, num_stages=4)
    if per_expert <= 96:
        return GemmConfig(64, 64, 128, num_warps=4, num_stages=4)
    return GemmConfig(128, 64, 128, num_warps=8, num_stages=3)


class TritonPreparedExperts(PreparedExperts):
    """The experts on the device, still packed (4 bits per weight, the SPEC-4 layout).

    ``w13`` int8 ``[E, I, H]``, ``w13_scale`` fp32 ``[E, 2I]``, ``w2`` int8 ``[E, H/2, I]``,
    ``w2_scale`` fp32 ``[E, H]``, all contiguous.
    """


@dataclass
class TritonInt8Linear:
    """A W8A8 Linear weight: int8 ``[N, K]`` and fp32 scales ``[N]``; on CUDA also the weight
    zero-padded to ``torch._int_mm``'s multiples of 8 (``None`` where it needs none)."""

    weight: torch.Tensor
    scale: torch.Tensor
    padded: torch.Tensor | None


def _check(t: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (where the weights are), got {t.device}")


class TritonBackend:
    """The Triton expert path (see the module docstring).

    ``gemm_config`` fixes the GEMM tiles (tests use small ones to exercise many tiles and
    K-tails); by default they follow :func:`default_gemm_config`.
    """

    name = "triton"

    def __init__(self, gemm_config: GemmConfig | None = None, row_block: int = 1024, combine_block: int = 1024):
        self.gemm_config = gemm_config
        self.row_block = row_block
        self.combine_block = combine_block
        self._silu: dict[torch.device, tuple[torch.Tensor, int]] = {}

    # ---- launches ------------------------------------------------------------------------

    def _launch(self, kernel, grid: tuple[int, ...], device: torch.device, *args, **meta) -> None:
        # No FMA contraction anywhere: every multiply-add must round twice, as torch's does.
        if device.type == "cuda":
            with torch.cuda.device(device):
                kernel[grid](*args, enable_fp_fusion=False, **meta)
        else:
            if not interpreting():
                raise RuntimeError(
                    f"the triton backend runs on CPU tensors only under Triton's interpreter "
                    f"({INTERPRET_ENV}=1, set before triton is first imported); got tensors on {device}"
                )
            if not _interpreter_active():
                raise RuntimeError(
                    f"{INTERPRET_ENV}=1 was set after triton was imported: triton's own functions were "
                    f"compiled for a GPU. Set it before triton is first imported (at process start)"
                )
            kernel[grid](*args, **meta)

    def _silu_table(self, device: torch.device) -> tuple[torch.Tensor, int]:
        """torch's silu of every bf16 value: [vector code | scalar code], and its vector width."""
        if device not in self._silu:
            from w4a8moe.kernels.cpu import silu_tables  # the one place the table is built

            tables = silu_tables()
            table = torch.cat((tables.vector, tables.scalar)).to(device)
            self._silu[device] = (table, tables.vec_block)
        return self._silu[device]

    def _schedule(self, expert_offsets: torch.Tensor, rows: int, block_m: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``(tile_expert int32, tile_row int64, expert_end int64, num_tiles)`` on the device.

        ``num_tiles`` is an upper bound known without reading the offsets (every tile holds
        at least one row, and each expert wastes less than one tile); the unused tail has
        ``tile_expert = -1``.
        """
        offsets = expert_offsets.to(torch.int64)
        e = offsets.numel() - 1
        counts = offsets[1:] - offsets[:-1]
        tiles = torch.div(counts + (block_m - 1), block_m, rounding_mode="floor")
        cum = torch.cumsum(tiles, 0)
        num_tiles = max(1, min(rows, (rows + e * (block_m - 1)) // block_m))
        t = torch.arange(num_tiles, device=offsets.device)
        tile_e = torch.searchsorted(cum, t, right=True)
        valid = tile_e < e
        tile_e = tile_e.clamp(max=e - 1)
        first = cum[tile_e] - tiles[tile_e]
        tile_row = offsets[tile_e] + (t - first) * block_m
        tile_expert = torch.where(valid, tile_e, torch.full_like(tile_e, -1)).to(torch.int32)
        return tile_expert, tile_row.contiguous(), offsets[1:].contiguous(), num_tiles

    def _grouped_gemm(self, a: torch.Tensor, a_scale: torch.Tensor | None, a_rows: torch.Tensor | None,
                      w: torch.Tensor, w_scale: torch.Tensor | None, expert_offsets: torch.Tensor, rows: int,
                      n: int, int4: bool, config: GemmConfig, schedule: tuple | None = None) -> torch.Tensor:
        """Rows ``[offsets[e], offsets[e+1])`` of the output times expert ``e``'s weight: bf16
        scaled, or int32 raw when ``w_scale`` is None. ``schedule``: :meth:`_schedule`'s
        result for these offsets, rows and ``config.block_m``, where the caller has it."""
        raw = w_scale is None
        out = torch.empty((rows, n), dtype=torch.int32 if raw else torch.bfloat16, device=a.device)
        if rows == 0 or n == 0:
            return out
        k = a.shape[1]
        tile_expert, tile_row, expert_end, num_tiles = schedule or self._schedule(expert_offsets, rows, config.block_m)
        channels_per_tile = 2 * config.block_p
        grid = (num_tiles, _cdiv(n, channels_per_tile))
        dummy = out  # never read when the matching flag is off
        self._launch(
            _kernels().grouped_gemm_kernel, grid, a.device,
            a, a_scale if a_scale is not None else dummy, a_rows if a_rows is not None else dummy,
            w, w_scale if w_scale is not None else dummy, out, tile_expert, tile_row, expert_end,
            n, k, a.stride(0),
            GATHER=a_rows is not None, INT4=int4, RAW_INT32=raw,
            BLOCK_M=config.block_m, BLOCK_P=config.block_p, BLOCK_K=config.block_k,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
        return out

    # ---- the expert path -----------------------------------------------------------------

    def prepare(self, weights: PackedExpertWeights) -> TritonPreparedExperts:
        """The weights as they are (contiguous, same device): the kernel reads the SPEC-4 bytes."""
        e, inter, hidden = weights.num_experts, weights.intermediate_size, weights.hidden_size
        device = weights.w13.device
        if hidden % 2:
            raise ValueError(f"hidden size {hidden} must be even (w2 packs output-channel pairs)")
        _check(weights.w13, "w13", torch.int8, (e, inter, hidden), device)
        _check(weights.w13_scale, "w13_scale", torch.float32, (e, 2 * inter), device)
        _check(weights.w2, "w2", torch.int8, (e, hidden // 2, inter), device)
        _check(weights.w2_scale, "w2_scale", torch.float32, (e, hidden), device)
        return TritonPreparedExperts(weights.w13.contiguous(), weights.w13_scale.contiguous(),
                                     weights.w2.contiguous(), weights.w2_scale.contiguous(), e, hidden, inter)

    def _validate(self, prepared: TritonPreparedExperts, x_q: torch.Tensor, x_scale: torch.Tensor,
                  token_ids: torch.Tensor, expert_offsets: torch.Tensor, alpha: torch.Tensor) -> None:
        device = prepared.w13.device
        m, e = x_q.shape[0] if x_q.dim() == 2 else -1, prepared.num_experts
        _check(x_q, "x_q", torch.int8, (m, prepared.hidden_size), device)
        if x_scale.numel() != m or x_scale.dtype != torch.float32 or x_scale.device != device:
            raise ValueError(f"x_scale: expected fp32 with {m} values on {device}, got {x_scale.dtype} "
                             f"{list(x_scale.shape)} on {x_scale.device}")
        if token_ids.dim() != 1 or token_ids.is_floating_point() or token_ids.device != device:
            raise ValueError(f"token_ids: expected integer [R] on {device}, got {token_ids.dtype} "
                             f"{list(token_ids.shape)} on {token_ids.device}")
        if expert_offsets.numel() != e + 1 or expert_offsets.device != device:
            raise ValueError(f"expert_offsets: expected {e + 1} entries on {device}, got "
                             f"{expert_offsets.numel()} on {expert_offsets.device}")
        if alpha.numel() != e or alpha.device != device:
            raise ValueError(f"alpha: expected {e} entries on {device}, got {alpha.numel()} on {alpha.device}")
        if device.type == "cpu":  # checks that read values; on a GPU they would cost a synchronisation
            offsets = expert_offsets.to(torch.int64)
            if int(offsets[0]) != 0 or bool((offsets[1:] < offsets[:-1]).any()):
                raise ValueError("expert_offsets must start at 0 and be non-decreasing")
            if int(offsets[-1]) != token_ids.numel():
                raise ValueError(f"expert_offsets end at {int(offsets[-1])} but there are {token_ids.numel()} rows")
            if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= m):
                raise ValueError(f"token_ids must lie in [0, {m})")

    def grouped_forward(
        self,
        prepared: TritonPreparedExperts,
        x_q: torch.Tensor,
        x_scale: torch.Tensor,
        token_ids: torch.Tensor,
        expert_offsets: torch.Tensor,
        alpha: torch.Tensor,
    ) -> torch.Tensor:
        """The expert path for routed rows (see :class:`w4a8moe.kernels.base.ExpertBackend`)."""
        self._validate(prepared, x_q, x_scale, token_ids, expert_offsets, alpha)
        rows, hidden, inter = token_ids.numel(), prepared.hidden_size, prepared.intermediate_size
        device = x_q.device
        if rows == 0:
            return torch.empty((0, hidden), dtype=torch.bfloat16, device=device)
        config = self.gemm_config or default_gemm_config(rows, prepared.num_experts)
        x_q = x_q.contiguous()
        xs = x_scale.reshape(-1).contiguous()
        ids = token_ids.to(torch.int64).contiguous()
        offsets = expert_offsets.to(torch.int64).contiguous()
        schedule = self._schedule(offsets, rows, config.block_m)  # one tile map for both GEMMs
        gate_up = self._grouped_gemm(x_q, xs, ids, prepared.w13, prepared.w13_scale, offsets, rows, 2 * inter,
                                     True, config, schedule)
        h_q, h_scale = self.swiglu_clip_quant(gate_up, alpha.to(torch.float32).contiguous(), offsets)
        return self._grouped_gemm(h_q, h_scale, None, prepared.w2, prepared.w2_scale, offsets, rows, hidden,
                                  True, config, schedule)

    def swiglu_clip_quant(self, gate_up: torch.Tensor, alpha: torch.Tensor, expert_offsets: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """SPEC 2 on bf16 ``gate_up`` ``[R, 2I]`` whose rows ``[offsets[e], offsets[e+1])``
        belong to expert ``e`` (clip ``alpha[e]``): ``(h_q int8 [R, I], c fp32 [R])``; the
        kernel step alone, also a test entry against :func:`w4a8moe.quant.swiglu_clip_quant`."""
        if gate_up.dtype != torch.bfloat16 or gate_up.dim() != 2 or gate_up.shape[1] % 2:
            raise ValueError(f"gate_up: expected bf16 [R, 2I], got {gate_up.dtype} {list(gate_up.shape)}")
        gate_up = gate_up.contiguous()
        rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
        device = gate_up.device
        h_q = torch.empty((rows, inter), dtype=torch.int8, device=device)
        h_scale = torch.empty((rows,), dtype=torch.float32, device=device)
        if rows == 0:
            return h_q, h_scale
        offsets = expert_offsets.to(device=device, dtype=torch.int64)
        row_expert = torch.searchsorted(offsets[1:].contiguous(), torch.arange(rows, device=device), right=True)
        row_expert = row_expert.clamp(max=offsets.numel() - 2)
        table, vec_block = self._silu_table(device)
        scalar_from = inter - inter % vec_block if vec_block else inter
        block = min(_next_power_of_2(max(inter, 1)), self.row_block)
        self._launch(_kernels().swiglu_clip_quant_kernel, (rows,), device, gate_up, alpha.to(torch.float32),
                     row_expert, table, h_q, h_scale, inter, scalar_from, BLOCK=block, num_warps=4)
        return h_q, h_scale

    def combined_forward(
        self,
        prepared: TritonPreparedExperts,
        x_q: torch.Tensor,
        x_scale: torch.Tensor,
        token_ids: torch.Tensor,
        expert_offsets: torch.Tensor,
        alpha: torch.Tensor,
        row_weights: torch.Tensor,
    ) -> torch.Tensor:
        """The expert path, then each token's weighted sum in increasing row order (see
        :class:`w4a8moe.kernels.base.ExpertBackend`)."""
        if row_weights.numel() != token_ids.numel() or row_weights.device != x_q.device:
            raise ValueError(f"row_weights: expected {token_ids.numel()} values on {x_q.device}, got "
                             f"{row_weights.numel()} on {row_weights.device}")
        rows = self.grouped_forward(prepared, x_q, x_scale, token_ids, expert_offsets, alpha)
        tokens, hidden = x_q.shape[0], prepared.hidden_size
        device = x_q.device
        out = torch.zeros((tokens, hidden), dtype=torch.float32, device=device)
        if rows.shape[0] == 0 or tokens == 0:
            return out
        ids = token_ids.to(torch.int64)
        token_rows = torch.argsort(ids, stable=True)  # each token's rows, in increasing r
        token_start = torch.searchsorted(ids[token_rows].contiguous(), torch.arange(tokens + 1, device=device))
        block = min(_next_power_of_2(hidden), self.combine_block)
        self._launch(_kernels().combine_kernel, (tokens, _cdiv(hidden, block)), device, rows,
                     row_weights.to(torch.float32).reshape(-1).contiguous(), token_rows, token_start, out, hidden,
                     BLOCK_H=block, num_warps=4)
        return out

    # ---- activations and W8A8 Linears ----------------------------------------------------

    def quantize_per_token(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`w4a8moe.quant.dynamic_quant_per_token` of bf16 or fp32 ``[M, K]`` rows, bit for
        bit for finite rows (IEEE division, not torch-CUDA's multiply by ``1/127``); other
        dtypes, shapes and empty inputs go to the torch function itself."""
        if x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float32) or x.shape[0] == 0 or x.shape[1] == 0:
            return dynamic_quant_per_token(x)
        x = x.contiguous()
        m, k = x.shape
        x_q = torch.empty((m, k), dtype=torch.int8, device=x.device)
        scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
        block = min(_next_power_of_2(k), 2048)
        self._launch(_kernels().quantize_rows_kernel, (m,), x.device, x, x_q, scale, k, BLOCK=block, num_warps=4)
        return x_q, scale

    def prepare_int8_linear(self, weight_q: torch.Tensor, weight_scale: torch.Tensor) -> TritonInt8Linear:
        """The weight (and, on CUDA, its copy padded for ``torch._int_mm`` where it needs one)."""
        if weight_q.dtype != torch.int8 or weight_q.dim() != 2:
            raise ValueError(f"expected an int8 [N, K] weight, got {weight_q.dtype} {list(weight_q.shape)}")
        n, k = weight_q.shape
        if weight_scale.numel() != n:
            raise ValueError(f"expected {n} weight scales, got {weight_scale.numel()}")
        weight_q = weight_q.contiguous()
        padded = pad_weight_for_int_mm(weight_q) if weight_q.device.type == "cuda" else None
        return TritonInt8Linear(weight_q, weight_scale.reshape(-1).to(torch.float32).contiguous(), padded)

    def int8_linear(self, prepared: TritonInt8Linear, x_q: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """bf16 ``(float(x_q @ W^T) * x_scale) * w_scale``: the bits of
        :func:`w4a8moe.quant.scaled_int_matmul`."""
        acc = self._int_matmul(x_q, prepared.weight, prepared.padded)
        return scale_int32(acc, x_scale, prepared.scale)

    def int_matmul(self, a_q: torch.Tensor, b_q: torch.Tensor) -> torch.Tensor:
        """exact int8 x int8 -> int32 `a_q @ b_q.T`"""
        return self._int_matmul(a_q, b_q, None)

    def _int_matmul(self, a_q: torch.Tensor, b_q: torch.Tensor, b_padded: torch.Tensor | None) -> torch.Tensor:
        if a_q.dtype != torch.int8 or b_q.dtype != torch.int8 or a_q.dim() != 2 or b_q.dim() != 2:
            raise ValueError(f"int_matmul: expected int8 [M, K] and [N, K], got {a_q.dtype} {list(a_q.shape)} "
                             f"and {b_q.dtype} {list(b_q.shape)}")
        if a_q.shape[1] != b_q.shape[1] or a_q.device != b_q.device:
            raise ValueError(f"int_matmul: K and device must match, got {list(a_q.shape)} on {a_q.device} and "
                             f"{list(b_q.shape)} on {b_q.device}")
        m, k = a_q.shape
        n = b_q.shape[0]
        if m == 0 or n == 0 or k == 0:
            return torch.zeros((m, n), dtype=torch.int32, device=a_q.device)
        if k > INT32_SAFE_K:
            # Exact in int64 over int32-safe K-chunks, then range-checked like the reference.
            total = torch.zeros((m, n), dtype=torch.int64, device=a_q.device)
            for k0 in range(0, k, INT32_SAFE_K):
                total += self._int_matmul(a_q[:, k0:k0 + INT32_SAFE_K], b_q[:, k0:k0 + INT32_SAFE_K], None)
            if bool((total.abs() >= 2**31).any()):
                raise OverflowError("int32 accumulator overflow")
            return total.to(torch.int32)
        if a_q.device.type == "cuda":
            return int_mm_padded(a_q, b_q, b_padded)
        return self.int_matmul_triton(a_q, b_q)

    def int_matmul_triton(self, a_q: torch.Tensor, b_q: torch.Tensor) -> torch.Tensor:
        """The same product with the Triton int8 GEMM (one "expert", no scales); K <= 65536."""
        m, k = a_q.shape
        n = b_q.shape[0]
        offsets = torch.tensor([0, m], dtype=torch.int64, device=a_q.device)
        config = self.gemm_config or default_gemm_config(m, 1)
        return self._grouped_gemm(a_q.contiguous(), None, None, b_q.contiguous().unsqueeze(0), None, offsets, m, n,
                                  False, config)


def _cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints."""
    return (a + b - 1) // b


def _next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 << (max(n, 1) - 1).bit_length()


@functools.lru_cache(maxsize=1)
def _shared_backend() -> TritonBackend:
    return TritonBackend()


def triton_backend_factory() -> TritonBackend | None:
    """The registered factory: a :class:`TritonBackend` where triton imports and there is a GPU
    (or the interpreter is on), else ``None``."""
    if not triton_available():
        return None
    if not (torch.cuda.is_available() or interpreting()):
        return None
    return _shared_backend()


register_backend("triton", triton_backend_factory, priority=1, devices=("cuda",))
