"""Open a W4A8 checkpoint of either format: detect, validate, hand out MoE layers.

Validation never guesses: every tensor a MoE layer needs is checked for presence, dtype and
shape from the safetensors headers (cheap), and, unless ``validate="structure"``, for its
values: finite positive scales, int4 values in [-7, 7], zero offsets, activation clips in
(0, 1], and each stored kernel bias against ``8 * s_n * sum_k q[n, k]``.

Kernel-bias tolerance: the stored value divided by ``8 * s_n`` must lie within
``0.5 + 1e-5 * sum_k |q[n, k]|`` of the exact integer ``sum_k q[n, k]``. The second term
absorbs fp32 summation-order differences between converters; the bound stays below one
quantum for any realistic K, so a bias computed from different integers is always caught.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from w4a8moe.errors import CheckpointError, ConfigError
from w4a8moe.formats import ascendv1, compressed_tensors
from w4a8moe.formats.layer_tensors import QuantizedMoELayer
from w4a8moe.formats.model_config import EXPERT_PROJECTIONS, MoEModelConfig
from w4a8moe.formats.safetensors_io import ShardedSafetensorsReader, TensorInfo
from w4a8moe.formats.schema import (
    ASCENDV1,
    COMPRESSED_TENSORS,
    FLOAT_DTYPES,
    TensorSpec,
    expert_projection_specs,
    w8a8_linear_specs,
)
from w4a8moe.quant import KERNEL_BIAS_CHUNKS, decode_scale_uint64, unpack_int4_pairs

BIAS_RTOL_OF_ABS_SUM = 1e-5
BIAS_ATOL_QUANTA = 0.5
_MAX_REPORTED = 40


class _Problems:
    """Collects validation failures so that one run reports all of them."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def raise_if_any(self, where: Path) -> None:
        if not self.items:
            return
        shown = self.items[:_MAX_REPORTED]
        more = len(self.items) - len(shown)
        tail = f"\n  ... and {more} more" if more else ""
        raise CheckpointError(
            f"{where}: {len(self.items)} problem(s):\n  " + "\n  ".join(shown) + tail
        )


def _fmt_dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _load_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.exists():
        raise CheckpointError(f"{directory}: config.json is missing")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"config.json: unreadable ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError("config.json: expected a JSON object")
    return config


def detect_format(directory: Path, config: dict) -> str:
    """``"ascendv1"`` or ``"compressed-tensors"``; raise if the folder is neither or both."""
    has_description = (directory / ascendv1.DESCRIPTION_FILE).exists()
    has_qc = "quantization_config" in config
    if has_description and has_qc:
        raise CheckpointError(
            f"{directory}: both {ascendv1.DESCRIPTION_FILE} and config.json:quantization_config are present; "
            "an AscendV1 checkpoint must not carry quantization_config"
        )
    if has_description:
        return ASCENDV1
    if has_qc:
        return COMPRESSED_TENSORS
    raise CheckpointError(
        f"{directory}: not a W4A8 checkpoint: neither {ascendv1.DESCRIPTION_FILE} nor config.json:quantization_config"
    )


_RELEASE_BYTES = 256 << 20
"""Verification unmaps the shards after reading about this much of the tensors outside MoE blocks."""


class Checkpoint:
    """A validated W4A8 MoE checkpoint on disk. Use :func:`open_checkpoint`."""

    def __init__(self, path: str | Path, validate: str = "full"):
        if validate not in ("full", "structure"):
            raise ValueError(f"validate must be 'full' or 'structure', got {validate!r}")
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory")
        self.config: dict = _load_config(self.path)
        self.format: str = detect_format(self.path, self.config)
        try:
            self.model_config = MoEModelConfig.from_dict(self.config)
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from exc
        self.description: dict[str, str] = {}
        self.activation_use_clip = False
        self.moe_group: str | None = None
        if self.format == ASCENDV1:
            self.description, self.description_globals = ascendv1.read_description(self.path)
            self.reader = ShardedSafetensorsReader(
                self.path, ascendv1.INDEX_FILE, [ascendv1.SINGLE_FILE], f"{ascendv1.WEIGHTS_PREFIX}*.safetensors"
            )
        else:
            self.scheme, self.activation_use_clip, self.moe_group = compressed_tensors.parse_quantization_config(
                self.config["quantization_config"]
            )
            self.reader = ShardedSafetensorsReader(
                self.path, compressed_tensors.INDEX_FILE, [compressed_tensors.SINGLE_FILE], "*.safetensors"
            )
        self.moe_layers: list[int] = self._discover_moe_layers()
        problems = _Problems()
        self._check_structure(problems)
        problems.raise_if_any(self.path)
        if validate == "full":
            self._check_values(problems)
            problems.raise_if_any(self.path)

    # ----------------------------------------------------------------- discovery
    def _discover_moe_layers(self) -> list[int]:
        names = self.model_config.names
        down = names.expert_proj[2]
        pattern = re.compile(
            rf"^model\.layers\.(\d+)\.{re.escape(names.block)}\.{re.escape(names.experts)}\.\d+\.{re.escape(down)}\.weight$"
        )
        layers = set()
        for name, info in self.reader.infos.items():
            m = pattern.match(name)
            if m and info.dtype == torch.int8:
                layers.add(int(m.group(1)))
        if not layers:
            raise CheckpointError(
                f"{self.path}: no W4A8 expert weights found (looked for int8 "
                f"'model.layers.L.{names.block}.{names.experts}.E.{down}.weight')"
            )
        return sorted(layers)

    # ----------------------------------------------------------------- structure
    def expected_layer_tensors(self, layer: int) -> dict[str, TensorSpec]:
        """Every tensor under the MoE block of ``layer`` with its spec."""
        mc = self.model_config
        names = mc.names
        prefix = names.layer_prefix(layer)
        e, h = mc.num_experts, mc.hidden_size
        specs: dict[str, TensorSpec] = {f"{prefix}.{names.router}.weight": TensorSpec(FLOAT_DTYPES, ((e, h),))}
        if mc.routing.method == "noaux_tc":
            specs[f"{prefix}.{names.router}.e_score_correction_bias"] = TensorSpec(FLOAT_DTYPES, ((e,),))
        for expert in range(e):
            for proj in EXPERT_PROJECTIONS:
                n, k = mc.projection_shape(proj)
                base = names.expert_weight(layer, expert, proj)
                for suffix, spec in expert_projection_specs(self.format, proj, n, k, h, self.activation_use_clip).items():
                    specs[f"{base}.{suffix}"] = spec
        if mc.shared_intermediate_size:
            for proj in EXPERT_PROJECTIONS:
                n, k = mc.shared_projection_shape(proj)
                base = names.shared_weight(layer, proj)
                info = self.reader.infos.get(f"{base}.weight")
                if info is not None and info.dtype == torch.int8:
                    for suffix, spec in w8a8_linear_specs(self.format, n, k).items():
                        specs[f"{base}.{suffix}"] = spec
                else:
                    specs[f"{base}.weight"] = TensorSpec(FLOAT_DTYPES, ((n, k),))
            if names.shared_gate:
                specs[f"{prefix}.{names.shared_gate}.weight"] = TensorSpec(FLOAT_DTYPES, ((1, h),))
        return specs

    def _check_spec(self, name: str, spec: TensorSpec, problems: _Problems) -> None:
        info: TensorInfo | None = self.reader.infos.get(name)
        if info is None:
            problems.add(f"missing tensor {name!r}: expected {spec.describe()}")
            return
        if info.dtype not in spec.dtypes or info.shape not in spec.shapes:
            problems.add(
                f"tensor {name!r}: expected {spec.describe()}, found {_fmt_dtype(info.dtype)} {list(info.shape)}"
            )

    def _check_structure(self, problems: _Problems) -> None:
        mc = self.model_config
        if mc.moe_intermediate_size % 2 or mc.hidden_size % 2:
            problems.add(f"config.json: hidden_size and moe_intermediate_size must be even for int4 pairs")
            return
        if self.format == ASCENDV1:
            if mc.moe_intermediate_size % KERNEL_BIAS_CHUNKS:
                problems.add(
                    f"config.json: moe_intermediate_size={mc.moe_intermediate_size} is not divisible by "
                    f"{KERNEL_BIAS_CHUNKS}, as the AscendV1 down-projection scale_bias needs"
                )
            for name in self.reader.infos:
                if name not in self.description:
                    problems.add(f"tensor {name!r} is in the weights but not in {ascendv1.DESCRIPTION_FILE}")
            for name in self.description:
                if name not in self.reader.infos:
                    problems.add(f"{ascendv1.DESCRIPTION_FILE} lists tensor {name!r}, which is not in the weights")
        covered: set[str] = set()
        for layer in self.moe_layers:
            specs = self.expected_layer_tensors(layer)
            covered.update(specs)
            for name, spec in specs.items():
                self._check_spec(name, spec, problems)
            prefix = mc.names.layer_prefix(layer) + "."
            for name in self.reader.infos:
                if name.startswith(prefix) and name not in specs:
                    problems.add(f"unexpected tensor {name!r} in MoE layer {layer}")
            if self.format == ASCENDV1:
                expert_root = f"{prefix}{mc.names.experts}."
                for name in specs:
                    kind = self.description.get(name)
                    if name.startswith(expert_root) and kind is not None and kind != ascendv1.W4A8:
                        problems.add(f"{ascendv1.DESCRIPTION_FILE}: {name!r} is {kind}, expected {ascendv1.W4A8}")
        # W8A8 linears elsewhere (attention, dense MLPs) need their scales too.
        for name, info in self.reader.infos.items():
            if name in covered or not name.endswith(".weight") or info.dtype != torch.int8 or len(info.shape) != 2:
                continue
            base = name[: -len(".weight")]
            n, k = info.shape
            for suffix, spec in w8a8_linear_specs(self.format, n, k).items():
                self._check_spec(f"{base}.{suffix}", spec, problems)

    # ----------------------------------------------------------------- values
    def _check_values(self, problems: _Problems) -> None:
        # What has been checked is released as it goes (experts not kept, shards unmapped every
        # _RELEASE_BYTES), so memory stays at one expert plus that, whatever the model's size.
        covered: set[str] = set()
        for layer in self.moe_layers:
            self._read_moe_layer(layer, problems, keep=False)
            covered.update(self.expected_layer_tensors(layer))
        read = 0
        for name in self.reader.names():
            if name in covered:
                continue
            info = self.reader.infos[name]
            if info.dtype in FLOAT_DTYPES or info.dtype == torch.float64:
                if read > _RELEASE_BYTES:
                    self.reader.close()
                    read = 0
                t = self.reader.get(name)
                read += t.numel() * t.element_size()
                if not bool(torch.isfinite(t).all()):
                    problems.add(f"tensor {name!r} holds NaN or Inf")
                if name.endswith(".weight_scale") and not bool((t > 0).all()):
                    problems.add(f"tensor {name!r}: scales must be > 0, found min {float(t.min()):g}")

    def _scale(self, name: str, problems: _Problems) -> torch.Tensor | None:
        t = self.reader.get(name)
        if t.dtype == torch.uint64:
            try:
                t = decode_scale_uint64(t)
            except ValueError as exc:
                problems.add(f"tensor {name!r}: {exc}")
                return None
        t = t.to(torch.float32).reshape(-1)
        if not bool(torch.isfinite(t).all()):
            problems.add(f"tensor {name!r}: scales must be finite, found NaN or Inf")
            return None
        if not bool((t > 0).all()):
            idx = int(torch.nonzero(t <= 0)[0])
            problems.add(f"tensor {name!r}: scales must be > 0, found {float(t[idx]):g} at row {idx}")
            return None
        return t

    def _check_bias(self, name: str, stored: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                    problems: _Problems) -> None:
        if not bool(torch.isfinite(stored).all()):
            problems.add(f"tensor {name!r}: kernel bias holds NaN or Inf")
            return
        n, k = q.shape
        chunks = stored.shape[-1] if stored.dim() == 2 and stored.shape[-1] != 1 else 1
        qc = q.to(torch.int64).reshape(n, chunks, k // chunks)
        exact = qc.sum(-1).to(torch.float64)
        abs_sum = qc.abs().sum(-1).to(torch.float64)
        implied = stored.to(torch.float64).reshape(n, chunks) / (8.0 * scale.to(torch.float64).reshape(n, 1))
        tol = BIAS_ATOL_QUANTA + BIAS_RTOL_OF_ABS_SUM * abs_sum
        bad = (implied - exact).abs() > tol
        if bool(bad.any()):
            row, col = (int(v) for v in torch.nonzero(bad)[0])
            expected = 8.0 * float(scale[row]) * float(exact[row, col])
            where = f"row {row}" + (f", chunk {col}" if chunks > 1 else "")
            problems.add(
                f"tensor {name!r}: {int(bad.sum())} value(s) differ from 8*s*sum(q); at {where} found "
                f"{float(stored.reshape(n, chunks)[row, col]):.6g}, expected {expected:.6g}"
            )

    def _load_expert_projection(self, base: str, proj: str, problems: _Problems):
        weight = self.reader.get(f"{base}.weight")
        q = unpack_int4_pairs(weight)
        if bool((q < -7).any()):
            n, k = (int(v) for v in torch.nonzero(q < -7)[0])
            problems.add(f"tensor '{base}.weight': int4 value -8 at channel {n}, column {k}; expected values in [-7, 7]")
        scale = self._scale(f"{base}.weight_scale", problems)
        if self.format == ASCENDV1:
            offset = self.reader.get(f"{base}.weight_offset")
            if not bool((offset == 0).all()):
                problems.add(f"tensor '{base}.weight_offset': expected all zeros (symmetric), found non-zero values")
            bias_name = f"{base}.scale_bias"
        else:
            bias_name = f"{base}.bias"
        if scale is not None:
            self._check_bias(bias_name, self.reader.get(bias_name), q, scale, problems)
        return weight, scale

    def load_moe_layer_tensors(self, layer: int) -> QuantizedMoELayer:
        """Load and validate one MoE layer's tensors; raise :class:`CheckpointError` on any defect."""
        if layer not in self.moe_layers:
            raise CheckpointError(f"layer {layer} has no W4A8 experts; W4A8 MoE layers are {self.moe_layers}")
        problems = _Problems()
        tensors = self._read_moe_layer(layer, problems)
        problems.raise_if_any(self.path)
        return tensors

    def _read_moe_layer(self, layer: int, problems: _Problems, keep: bool = True) -> QuantizedMoELayer | None:
        """Read one MoE layer, adding every defect found to ``problems``.

        ``keep=False`` (verification only) keeps no expert: each is checked, dropped and its
        shard pages unmapped, and ``None`` is returned.
        """
        mc = self.model_config
        names = mc.names
        prefix = names.layer_prefix(layer)
        e = mc.num_experts
        packed: dict[str, torch.Tensor] = {}
        scales: dict[str, torch.Tensor] = {}
        for proj in EXPERT_PROJECTIONS if keep else ():
            n, k = mc.projection_shape(proj)
            packed[proj] = torch.empty((e, n // 2, k), dtype=torch.int8)
            scales[proj] = torch.empty((e, n), dtype=torch.float32)
        alpha = torch.ones(e, dtype=torch.float32)
        for expert in range(e):
            for proj in EXPERT_PROJECTIONS:
                base = names.expert_weight(layer, expert, proj)
                weight, scale = self._load_expert_projection(base, proj, problems)
                if not keep:
                    continue
                packed[proj][expert] = weight
                if scale is not None:
                    scales[proj][expert] = scale
            if self.activation_use_clip:
                name = f"{names.expert_weight(layer, expert, 'down')}.alpha"
                a = float(self.reader.get(name).reshape(()))
                if not (0.0 < a <= 1.0):  # also false for NaN
                    problems.add(f"tensor {name!r}: activation clip must lie in (0, 1], found {a!r}")
                else:
                    alpha[expert] = a
            if not keep:
                self.reader.close()
        router = self.reader.get(f"{prefix}.{names.router}.weight")
        if not bool(torch.isfinite(router).all()):
            problems.add(f"tensor '{prefix}.{names.router}.weight' holds NaN or Inf")
        correction = None
        if mc.routing.method == "noaux_tc":
            cname = f"{prefix}.{names.router}.e_score_correction_bias"
            correction = self.reader.get(cname).to(torch.float32)
            if not bool(torch.isfinite(correction).all()):
                problems.add(f"tensor {cname!r} holds NaN or Inf")
        shared = None
        shared_gate = None
        if mc.shared_intermediate_size:
            shared = {}
            for proj in EXPERT_PROJECTIONS:
                base = names.shared_weight(layer, proj)
                w = self.reader.get(f"{base}.weight")
                if w.dtype == torch.int8:
                    shared[proj] = (w, self._scale(f"{base}.weight_scale", problems))
                else:
                    if not bool(torch.isfinite(w).all()):
                        problems.add(f"tensor '{base}.weight' holds NaN or Inf")
                    shared[proj] = (w, None)
            if names.shared_gate:
                shared_gate = self.reader.get(f"{prefix}.{names.shared_gate}.weight")
        if not keep:
            self.reader.close()
            return None
        return QuantizedMoELayer(router, packed, scales, alpha, correction, shared, shared_gate)

    # ----------------------------------------------------------------- public
    def moe_layer(self, index: int, apply_alpha: bool = True, backend: str | None = None) -> torch.nn.Module:
        """The W4A8 MoE block of layer ``index`` as a module (bf16 ``[M, H]`` in and out).

        ``apply_alpha=False`` ignores the activation clips, as upstream sglang does.
        """
        from w4a8moe.moe.layer import W4A8MoE  # formats sits below moe; import at use

        return W4A8MoE.from_quantized(
            self.load_moe_layer_tensors(index), self.model_config.routing, apply_alpha=apply_alpha, backend=backend
        )

    def summary(self) -> dict:
        """Facts for ``w4a8moe inspect``: format, clip flag, layers, experts, sizes."""
        mc = self.model_config
        expert_params = 0
        for proj in EXPERT_PROJECTIONS:
            n, k = mc.projection_shape(proj)
            expert_params += n * k
        routed = expert_params * mc.num_experts * len(self.moe_layers)
        return {
            "path": str(self.path),
            "format": self.format,
            "model_type": mc.model_type,
            "activation_use_clip": self.activation_use_clip,
            "moe_layers": self.moe_layers,
            "num_experts": mc.num_experts,
            "top_k": mc.top_k,
            "hidden_size": mc.hidden_size,
            "moe_intermediate_size": mc.moe_intermediate_size,
            "shared_intermediate_size": mc.shared_intermediate_size,
            "routing": mc.routing.method,
            "num_tensors": len(self.reader.infos),
            "checkpoint_bytes": self.reader.nbytes(),
            "routed_expert_params": routed,
            "routed_expert_bytes_w4": routed // 2,
            "routed_expert_bytes_w8a8": routed,
            "routed_expert_bytes_bf16": routed * 2,
        }


def open_checkpoint(path: str | Path, validate: str = "full") -> Checkpoint:
    """Open and validate a W4A8 checkpoint; raise :class:`CheckpointError` naming each defect.

    ``validate="structure"`` checks names, dtypes and shapes only (headers, fast);
    ``"full"`` (default) also checks every value (scales, int4 range, biases, clips, NaN).
    Layers handed out by :meth:`Checkpoint.moe_layer` are always value-checked.
    """
    return Checkpoint(path, validate=validate)
