"""What every W4A8 checkpoint format object offers (SPEC sections 5, 6).

A :class:`CheckpointFormat` owns all knowledge of one on-disk layout: its name, how a folder
is recognised, where the weights live, which tensors an expert projection and a W8A8 Linear
hold (names, dtypes, shapes), how scales are encoded, how the kernel bias is stored and
checked, whether the activation clip can be carried, and how the metadata (AscendV1
description, compressed-tensors ``quantization_config``) is written and read. The reader,
the writer, the model loader, the converter and engine plugins ask the object; nothing
outside :mod:`w4a8moe.formats` compares format names.

The concrete formats are :data:`w4a8moe.formats.ascendv1.ASCENDV1` and
:data:`w4a8moe.formats.compressed_tensors.COMPRESSED_TENSORS`; the registry
(:mod:`w4a8moe.formats.registry`) maps names to them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from w4a8moe.errors import CheckpointError
from w4a8moe.formats.schema import TensorSpec
from w4a8moe.quant import decode_scale_uint64, unpack_int4_pairs

# Tensor roles the writer records for every tensor (AscendV1's description vocabulary, which
# says exactly what is needed: kept float, W8A8 dynamic Linear, W4A8 expert).
FLOAT = "FLOAT"
W8A8_DYNAMIC = "W8A8_DYNAMIC"
W4A8_DYNAMIC = "W4A8_DYNAMIC"

# Kernel-bias tolerance (see :meth:`CheckpointFormat.check_kernel_bias`).
BIAS_RTOL_OF_ABS_SUM = 1e-5
BIAS_ATOL_QUANTA = 0.5

TensorGetter = Callable[[str], torch.Tensor]
"""Reads a tensor by its full name (e.g. ``ShardedSafetensorsReader.get``)."""


@dataclass(frozen=True)
class WriteOptions:
    """The per-checkpoint choices a format allows when writing (resolved, validated)."""

    activation_use_clip: bool
    quant_method: str | None = None


@dataclass
class FormatMetadata:
    """What a checkpoint's metadata says, as its format read it.

    ``description``: AscendV1 tensor name -> type (empty for compressed-tensors);
    ``scheme``: the validated compressed-tensors ``QuantizationConfig`` (``None`` for AscendV1);
    ``moe_group``: the config group of the routed experts; ``quant_method``: the spelling found.
    """

    activation_use_clip: bool = False
    description: dict[str, str] = field(default_factory=dict)
    description_globals: dict[str, object] = field(default_factory=dict)
    scheme: object | None = None
    moe_group: str | None = None
    quant_method: str | None = None


@dataclass
class ExpertProjection:
    """One expert projection read and value-checked: packed int8 ``[N/2, K]`` weight, fp32 ``[N]``
    scale (``None`` when it was unusable) and, for a clip-format down projection, its ``alpha``."""

    weight: torch.Tensor
    scale: torch.Tensor | None
    alpha: float | None = None


class CheckpointFormat:
    """One W4A8 checkpoint layout. Subclasses fill the class attributes and the hooks below.

    Objects compare equal to each other by name and to their name string
    (``fmt == "ascendv1"``), hash as their name and print as it, so a format object can
    stand wherever a name was used.
    """

    name: str = ""
    weights_prefix: str = ""
    """Shards are ``{weights_prefix}-NNNNN.safetensors``."""
    index_file: str = ""
    single_file: str = ""
    shard_glob: str = ""
    """Which ``*.safetensors`` files in the folder belong to the weights."""
    marker: str = ""
    """What marks a folder as this format (for messages)."""
    carries_activation_clip: bool = False
    """Whether the format can store the per-expert activation clip ``alpha``."""
    quant_methods: tuple[str, ...] = ()
    """Accepted ``quant_method`` spellings, the default first (empty: the format has none)."""

    # ------------------------------------------------------------ identity
    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    def __format__(self, spec: str) -> str:
        return format(self.name, spec)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CheckpointFormat):
            return self.name == other.name
        if isinstance(other, str):
            return self.name == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.name)

    @property
    def default_quant_method(self) -> str | None:
        """The ``quant_method`` written unless another is asked for (``None``: the format has none)."""
        return self.quant_methods[0] if self.quant_methods else None

    # ------------------------------------------------------------ detection
    def detect(self, directory: str | Path, config: dict | None = None) -> bool:
        """Whether ``directory`` carries this format's marker (``config``: its config.json, read if None)."""
        raise NotImplementedError

    # ------------------------------------------------------------ metadata
    def write_options(self, activation_use_clip: bool | None = None, quant_method: str | None = None) -> WriteOptions:
        """Resolve and validate the write choices; ``None`` takes the format's default.

        Raises ``ValueError`` for a choice the format cannot carry.
        """
        if activation_use_clip and not self.carries_activation_clip:
            raise ValueError(f"the {self.name} format has no activation clip; use compressed-tensors")
        if activation_use_clip is None:
            activation_use_clip = self.carries_activation_clip
        if quant_method is not None and quant_method not in self.quant_methods:
            if not self.quant_methods:
                raise ValueError(f"the {self.name} format has no quant_method (it is marked by {self.marker})")
            raise ValueError(f"quant_method must be one of {self.quant_methods} for {self.name}, got {quant_method!r}")
        return WriteOptions(bool(activation_use_clip), quant_method or self.default_quant_method)

    def read_metadata(self, directory: Path, config: dict) -> FormatMetadata:
        """Read and validate the format's metadata; raise :class:`CheckpointError` naming the fault."""
        raise NotImplementedError

    def record_tensor(self, name: str, tensor: torch.Tensor, role: str, types: dict[str, str],
                      ignore: list[str]) -> None:
        """Note what the metadata will need of one written tensor of ``role``
        (:data:`FLOAT`, :data:`W8A8_DYNAMIC`, :data:`W4A8_DYNAMIC`): the AscendV1 description
        entry in ``types``, or the compressed-tensors ``ignore`` entry in ``ignore``."""
        raise NotImplementedError

    def write_metadata(self, directory: Path, config: dict, types: dict[str, str], ignore: list[str],
                       options: WriteOptions, description_metadata: dict | None = None) -> dict:
        """Write the format's side files (atomically) and return the ``config.json`` content.

        ``types``: tensor name -> role (:data:`FLOAT`, :data:`W8A8_DYNAMIC`,
        :data:`W4A8_DYNAMIC`) of every tensor written; ``ignore``: the float Linears (the
        compressed-tensors ``ignore`` list).
        """
        raise NotImplementedError

    def metadata_problems(self, model_config, infos: dict, metadata: FormatMetadata,
                          expert_tensors: set[str]) -> list[str]:
        """Format-specific structure defects: shape rules, metadata against the weights.

        ``infos``: every tensor's header info; ``expert_tensors``: the routed-expert tensor names.
        """
        return []

    # ------------------------------------------------------------ tensors
    def expert_tensor_specs(self, prefix: str, proj: str, n: int, k: int, hidden: int,
                            with_alpha: bool = False) -> dict[str, TensorSpec]:
        """Full tensor name -> spec (allowed dtypes, exact shape) for one routed expert projection.

        ``prefix`` is the projection's name without suffix
        (``model.layers.L.mlp.experts.E.down_proj``), ``proj`` one of gate/up/down, the unpacked
        weight is ``[n, k]``, ``hidden`` the model's hidden size; ``with_alpha``: the
        checkpoint carries the activation clip (down projection only).
        """
        return {f"{prefix}.{suffix}": spec for suffix, spec in self.expert_specs(proj, n, k, hidden, with_alpha).items()}

    def expert_specs(self, proj: str, n: int, k: int, hidden: int, with_alpha: bool) -> dict[str, TensorSpec]:
        """Suffix -> spec for one routed expert projection (see :meth:`expert_tensor_specs`)."""
        raise NotImplementedError

    def expert_tensors(self, proj: str, packed: torch.Tensor, scale: torch.Tensor,
                       alpha: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Suffix -> tensor for one expert projection, as this format stores it.

        ``packed`` int8 ``[N/2, K]`` and ``scale`` fp32 ``[N]``; ``alpha`` a 0-d fp32 tensor for
        the down projection of a checkpoint with the activation clip.
        """
        raise NotImplementedError

    def kernel_bias_suffix(self, proj: str) -> str:
        """The suffix of the stored kernel bias ``8 * s_n * sum_k q[n, k]``."""
        raise NotImplementedError

    def linear_specs(self, n: int, k: int) -> dict[str, TensorSpec]:
        """Suffix -> spec for a W8A8-dynamic Linear with int8 weight ``[n, k]``."""
        raise NotImplementedError

    def linear_tensors(self, weight_q: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """Suffix -> tensor for a W8A8-dynamic Linear (int8 ``[N, K]`` weight, fp32 ``[N]`` scale)."""
        raise NotImplementedError

    def linear_tensor_specs(self, prefix: str, n: int, k: int) -> dict[str, TensorSpec]:
        """Full tensor name -> spec for the W8A8-dynamic Linear ``prefix`` with int8 weight ``[n, k]``."""
        return {f"{prefix}.{suffix}": spec for suffix, spec in self.linear_specs(n, k).items()}

    def linear_problems(self, base: str, get: TensorGetter) -> list[str]:
        """Value defects of a W8A8 Linear's format-specific tensors (e.g. non-zero offsets)."""
        return []

    # ------------------------------------------------------------ values
    def decode_scale(self, t: torch.Tensor) -> torch.Tensor:
        """A stored per-channel scale (fp32/bf16 ``[N, 1]`` or uint64 with fp32 bits in the low
        half) as fp32 ``[N]``. Raises ``ValueError`` for a uint64 with high bits set."""
        if t.dtype == torch.uint64:
            t = decode_scale_uint64(t)
        return t.to(torch.float32).reshape(-1)

    def load_scale(self, name: str, get: TensorGetter, problems: list[str]) -> torch.Tensor | None:
        """Read and decode the scale ``name``; ``None`` (and a problem) unless finite and > 0."""
        try:
            t = self.decode_scale(get(name))
        except ValueError as exc:
            problems.append(f"tensor {name!r}: {exc}")
            return None
        if not bool(torch.isfinite(t).all()):
            problems.append(f"tensor {name!r}: scales must be finite, found NaN or Inf")
            return None
        if not bool((t > 0).all()):
            idx = int(torch.nonzero(t <= 0)[0])
            problems.append(f"tensor {name!r}: scales must be > 0, found {float(t[idx]):g} at row {idx}")
            return None
        return t

    def check_kernel_bias(self, name: str, stored: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> str | None:
        """Check a stored kernel bias against the weight it belongs to; the defect, or ``None``.

        ``q`` unpacked int4 ``[N, K]``, ``scale`` fp32 ``[N]``; ``stored`` ``[N]``, ``[N, 1]`` or
        ``[N, C]`` (C partial sums over equal K-chunks). The stored value divided by
        ``8 * s_n`` must lie within ``0.5 + 1e-5 * sum_k |q[n, k]|`` of the exact integer
        ``sum_k q[n, k]`` (of each chunk): the second term absorbs fp32 summation-order
        differences between converters, and the bound stays below one quantum for any
        realistic K, so a bias computed from different integers is always caught.
        """
        if not bool(torch.isfinite(stored).all()):
            return f"tensor {name!r}: kernel bias holds NaN or Inf"
        n, k = q.shape
        chunks = stored.shape[-1] if stored.dim() == 2 and stored.shape[-1] != 1 else 1
        qc = q.to(torch.int64).reshape(n, chunks, k // chunks)
        exact = qc.sum(-1).to(torch.float64)
        abs_sum = qc.abs().sum(-1).to(torch.float64)
        implied = stored.to(torch.float64).reshape(n, chunks) / (8.0 * scale.to(torch.float64).reshape(n, 1))
        tol = BIAS_ATOL_QUANTA + BIAS_RTOL_OF_ABS_SUM * abs_sum
        bad = (implied - exact).abs() > tol
        if not bool(bad.any()):
            return None
        row, col = (int(v) for v in torch.nonzero(bad)[0])
        expected = 8.0 * float(scale[row]) * float(exact[row, col])
        where = f"row {row}" + (f", chunk {col}" if chunks > 1 else "")
        return (f"tensor {name!r}: {int(bad.sum())} value(s) differ from 8*s*sum(q); at {where} found "
                f"{float(stored.reshape(n, chunks)[row, col]):.6g}, expected {expected:.6g}")

    def expert_problems(self, prefix: str, get: TensorGetter) -> list[str]:
        """Value defects of an expert projection's format-specific tensors (e.g. non-zero offsets)."""
        return []

    def load_expert_projection(self, prefix: str, proj: str, get: TensorGetter, problems: list[str],
                               with_alpha: bool = False) -> ExpertProjection:
        """Read one expert projection and check every value, appending each defect to ``problems``.

        Checks: int4 values in [-7, 7], scales finite and > 0, the stored kernel bias against
        ``8 * s * sum(q)``, the format's own extras, and (``with_alpha``, down projection)
        the activation clip in (0, 1]. Shapes and dtypes are checked beforehand from
        :meth:`expert_tensor_specs`.
        """
        weight = get(f"{prefix}.weight")
        q = unpack_int4_pairs(weight)
        if bool((q < -7).any()):
            n, k = (int(v) for v in torch.nonzero(q < -7)[0])
            problems.append(f"tensor '{prefix}.weight': int4 value -8 at channel {n}, column {k}; "
                            "expected values in [-7, 7]")
        scale = self.load_scale(f"{prefix}.weight_scale", get, problems)
        problems.extend(self.expert_problems(prefix, get))
        if scale is not None:
            bias_name = f"{prefix}.{self.kernel_bias_suffix(proj)}"
            defect = self.check_kernel_bias(bias_name, get(bias_name), q, scale)
            if defect:
                problems.append(defect)
        alpha = None
        if with_alpha and proj == "down":
            alpha = self.load_alpha(prefix, get, problems)
        return ExpertProjection(weight, scale, alpha)

    def load_alpha(self, down_prefix: str, get: TensorGetter, problems: list[str]) -> float | None:
        """The activation clip of one expert (``None`` and a problem unless in (0, 1])."""
        raise NotImplementedError(f"the {self.name} format has no activation clip")


def read_config(directory: Path) -> dict:
    """``directory/config.json`` as a dict; :class:`CheckpointError` if missing or not an object."""
    path = Path(directory) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{directory}: config.json is missing")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"config.json: unreadable ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError("config.json: expected a JSON object")
    return config
