"""The source: a Hugging Face checkpoint folder (bf16/fp16/fp32 or DeepSeek block-FP8).

Tensors are read lazily, one at a time, from memory-mapped safetensors shards; FP8 weights
are dequantized block-wise on the way out (``weight * weight_scale_inv`` per 128x128 block,
edge blocks ragged), so the rest of the converter only ever sees float tensors.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from w4a8moe.errors import ConfigError, ConversionError
from w4a8moe.formats.model_config import EXPERT_PROJECTIONS, MoEModelConfig
from w4a8moe.formats.safetensors_io import ShardedSafetensorsReader, TensorInfo

HF_INDEX_FILE = "model.safetensors.index.json"
HF_SINGLE_FILE = "model.safetensors"
FP8_SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FLOAT_SOURCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
NON_WEIGHT_SUFFIXES = (".json", ".py", ".model", ".txt", ".tiktoken", ".jinja", ".md")
"""Files copied to the output besides the weights (tokenizer, generation config, model code)."""
_SKIPPED_FILES = {"config.json", HF_INDEX_FILE}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def dequantize_fp8_blockwise(weight: torch.Tensor, scale_inv: torch.Tensor,
                             block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """DeepSeek block FP8 to fp32: ``W[n, k] = weight[n, k] * scale_inv[n // bn, k // bk]``.

    ``weight`` ``[N, K]`` (float8); ``scale_inv`` fp32 ``[ceil(N/bn), ceil(K/bk)]``. Edge blocks
    are ragged when ``N`` or ``K`` is not a multiple of the block. Raises ``ValueError`` on a
    scale grid of the wrong shape.
    """
    if weight.dim() != 2:
        raise ValueError(f"FP8 weight must be 2-D, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    bn, bk = block
    grid = (-(-n // bn), -(-k // bk))
    if tuple(scale_inv.shape) != grid:
        raise ValueError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)}; a {n}x{k} weight with {bn}x{bk} blocks needs {grid}"
        )
    s = scale_inv.to(torch.float32)
    expanded = s.repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]
    return weight.to(torch.float32) * expanded


@dataclass(frozen=True)
class SourceTensor:
    """One logical source tensor: its name and, for FP8 weights, the scale tensor's name."""

    name: str
    info: TensorInfo
    scale_name: str | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape


class SourceCheckpoint:
    """A Hugging Face MoE checkpoint folder, opened for streaming conversion.

    Checks up front that ``config.json`` names a supported MoE family, that the index and
    shards agree, and (FP8) that every float8 weight has its block scales.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConversionError(f"{self.path}: source is not a directory")
        config_path = self.path / "config.json"
        if not config_path.exists():
            raise ConversionError(f"{self.path}: config.json is missing")
        try:
            self.config: dict = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConversionError(f"{config_path}: unreadable ({exc})") from exc
        self.model_config = MoEModelConfig.from_dict(self.config)  # ConfigError on unsupported families
        self.reader = ShardedSafetensorsReader(self.path, HF_INDEX_FILE, [HF_SINGLE_FILE], "*.safetensors")
        self.fp8_block = self._fp8_block()
        self.tensors: dict[str, SourceTensor] = {}
        scale_names = set()
        for name, info in self.reader.infos.items():
            if name.endswith(FP8_SCALE_SUFFIX):
                scale_names.add(name)
                continue
            scale_name = None
            if info.dtype in FP8_DTYPES:
                scale_name = name + FP8_SCALE_SUFFIX
                if self.fp8_block is None:
                    raise ConversionError(
                        f"tensor {name!r} is {info.dtype} but config.json has no quantization_config "
                        "with quant_method 'fp8' and weight_block_size"
                    )
                if scale_name not in self.reader.infos:
                    raise ConversionError(f"FP8 tensor {name!r} has no block scales {scale_name!r}")
            elif info.dtype not in FLOAT_SOURCE_DTYPES:
                raise ConversionError(f"tensor {name!r} has dtype {info.dtype}; expected bf16/fp16/fp32 or FP8")
            self.tensors[name] = SourceTensor(name, info, scale_name)
        orphans = sorted(s for s in scale_names if s[: -len(FP8_SCALE_SUFFIX)] not in self.tensors)
        if orphans:
            raise ConversionError(f"scale tensor {orphans[0]!r} has no FP8 weight {orphans[0][:-len(FP8_SCALE_SUFFIX)]!r}")

    def _fp8_block(self) -> tuple[int, int] | None:
        qc = self.config.get("quantization_config")
        if not qc:
            return None
        if not isinstance(qc, dict) or qc.get("quant_method") != "fp8":
            raise ConversionError(
                f"config.json: source quantization_config {qc.get('quant_method') if isinstance(qc, dict) else qc!r} "
                "is not supported; the converter reads float checkpoints and DeepSeek block FP8 (quant_method 'fp8')"
            )
        block = qc.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise ConfigError(f"config.json: quantization_config.weight_block_size must be [rows, cols], got {block!r}")
        return int(block[0]), int(block[1])

    # ------------------------------------------------------------------ facts
    @property
    def is_fp8(self) -> bool:
        return self.fp8_block is not None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        """Logical tensor names (FP8 scale tensors folded into their weights), sorted."""
        return sorted(self.tensors)

    def compute_dtype(self) -> torch.dtype:
        """The dtype the source model runs in: its expert weights' dtype, bf16 for FP8."""
        mc = self.model_config
        for layer in mc.expected_moe_layers:
            name = mc.names.expert_weight(layer, 0, "down") + ".weight"
            if name in self.tensors:
                dt = self.tensors[name].info.dtype
                return torch.bfloat16 if dt in FP8_DTYPES else dt
        return torch.bfloat16

    def file_bytes(self) -> int:
        """Bytes of all safetensors data in the source (weights and FP8 scales)."""
        return self.reader.nbytes()

    def largest_shard_bytes(self) -> int:
        """Size of the largest source safetensors file."""
        files = {info.file for info in self.reader.infos.values()}
        return max((f.stat().st_size for f in files), default=0)

    def non_weight_files(self) -> list[Path]:
        """Tokenizer files, generation config, model code, ...: copied to the output unchanged."""
        out = []
        for p in sorted(self.path.iterdir()):
            if p.is_file() and p.name not in _SKIPPED_FILES and p.suffix in NON_WEIGHT_SUFFIXES \
                    and not p.name.startswith("."):
                out.append(p)
        return out

    def layer_of(self, name: str) -> int | None:
        """Decoder layer index of a tensor name, ``None`` outside ``model.layers``."""
        m = _LAYER_RE.match(name)
        return int(m.group(1)) if m else None

    def layer_names(self) -> dict[int | None, list[str]]:
        """Tensor names grouped by decoder layer (``None``: embeddings, final norm, lm_head, ...)."""
        groups: dict[int | None, list[str]] = {}
        for name in self.names():
            groups.setdefault(self.layer_of(name), []).append(name)
        return groups

    def source_bytes_of(self, names: list[str]) -> int:
        """Bytes on disk of these logical tensors (FP8 scales included)."""
        total = 0
        for n in names:
            t = self.tensors[n]
            total += _nbytes(t.info)
            if t.scale_name:
                total += _nbytes(self.reader.infos[t.scale_name])
        return total

    # ------------------------------------------------------------------ reading
    def require(self, name: str) -> SourceTensor:
        """The tensor's record; :class:`ConversionError` naming it when absent."""
        t = self.tensors.get(name)
        if t is None:
            raise ConversionError(f"source checkpoint {self.path.name}: missing tensor {name!r}")
        return t

    def load(self, name: str) -> torch.Tensor:
        """Load one tensor as stored (FP8 dequantized to fp32); raise naming it when absent."""
        t = self.require(name)
        try:
            raw = self.reader.get(name)
            if t.scale_name is None:
                return raw
            return dequantize_fp8_blockwise(raw, self.reader.get(t.scale_name), self.fp8_block)
        except ValueError as exc:
            raise ConversionError(f"tensor {name!r}: {exc}") from exc

    def load_float(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Load one tensor as ``dtype``."""
        return self.load(name).to(dtype)

    def load_expert(self, layer: int, expert: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """One routed expert's gate/up/down weights."""
        names = self.model_config.names
        return {p: self.load_float(names.expert_weight(layer, expert, p) + ".weight", dtype) for p in EXPERT_PROJECTIONS}

    def release(self) -> None:
        """Unmap the source shards: pages read so far stop counting as this process's memory.

        Later reads map them again; the tensors already loaded are copies and stay valid.
        """
        self.reader.close()

    def check_moe_layer(self, layer: int) -> None:
        """Raise :class:`ConversionError` naming the first missing or misshapen tensor of a MoE block."""
        mc = self.model_config
        names = mc.names
        prefix = names.layer_prefix(layer)
        self._check_shape(f"{prefix}.{names.router}.weight", (mc.num_experts, mc.hidden_size))
        if mc.routing.method == "noaux_tc":
            self._check_shape(f"{prefix}.{names.router}.e_score_correction_bias", (mc.num_experts,))
        for expert in range(mc.num_experts):
            for proj in EXPERT_PROJECTIONS:
                self._check_shape(names.expert_weight(layer, expert, proj) + ".weight", mc.projection_shape(proj))
        if mc.shared_intermediate_size:
            for proj in EXPERT_PROJECTIONS:
                self._check_shape(names.shared_weight(layer, proj) + ".weight", mc.shared_projection_shape(proj))
            if names.shared_gate:
                self._check_shape(f"{prefix}.{names.shared_gate}.weight", (1, mc.hidden_size))

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        t = self.require(name)
        if tuple(t.shape) != tuple(shape):
            raise ConversionError(f"source tensor {name!r} has shape {list(t.shape)}, config.json implies {list(shape)}")


def _nbytes(info: TensorInfo) -> int:
    numel = 1
    for d in info.shape:
        numel *= d
    return numel * torch.empty((), dtype=info.dtype).element_size()
