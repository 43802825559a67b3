"""Open a W4A8 checkpoint of either format: detect, validate, hand out MoE layers.

Validation never guesses: every tensor a MoE layer needs is checked for presence, dtype and
shape from the safetensors headers (cheap), and, unless ``validate="structure"``, for its
values: finite positive scales, int4 values in [-7, 7], zero offsets, activation clips in
(0, 1], and each stored kernel bias against ``8 * s_n * sum_k q[n, k]`` (tolerance: see
:meth:`~w4a8moe.formats.base.CheckpointFormat.check_kernel_bias`). What each format stores
is asked of its format object (:attr:`Checkpoint.format`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from w4a8moe.errors import CheckpointError, ConfigError
from w4a8moe.formats.base import CheckpointFormat, read_config
from w4a8moe.formats.layer_tensors import QuantizedMoELayer
from w4a8moe.formats.model_config import EXPERT_PROJECTIONS, MoEModelConfig
from w4a8moe.formats.registry import detect_format
from w4a8moe.formats.safetensors_io import ShardedSafetensorsReader, TensorInfo
from w4a8moe.formats.schema import FLOAT_DTYPES, TensorSpec

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


_RELEASE_BYTES = 256 << 20
"""Verification unmaps the shards after reading about this much of the tensors outside MoE blocks."""


class Checkpoint:
    """A validated W4A8 MoE checkpoint on disk. Use :func:`open_checkpoint`.

    ``format`` is the format object (``== "ascendv1"`` / ``"compressed-tensors"``, ``.name``);
    ``metadata`` what its metadata said (:class:`~w4a8moe.formats.base.FormatMetadata`), also
    as ``activation_use_clip``, ``quant_method``, ``moe_group``, ``description``, ``scheme``.
    """

    def __init__(self, path: str | Path, validate: str = "full"):
        if validate not in ("full", "structure"):
            raise ValueError(f"validate must be 'full' or 'structure', got {validate!r}")
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory")
        self.config: dict = read_config(self.path)
        self.format: CheckpointFormat = detect_format(self.path, self.config)
        """The format object (compares equal to its name: ``ckpt.format == "ascendv1"``; ``.name``)."""
        try:
            self.model_config = MoEModelConfig.from_dict(self.config)
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from exc
        self.metadata = self.format.read_metadata(self.path, self.config)
        self.description: dict[str, str] = self.metadata.description
        self.description_globals: dict[str, object] = self.metadata.description_globals
        self.activation_use_clip: bool = self.metadata.activation_use_clip
        self.moe_group: str | None = self.metadata.moe_group
        self.scheme = self.metadata.scheme
        self.quant_method: str | None = self.metadata.quant_method
        self.reader = ShardedSafetensorsReader(
            self.path, self.format.index_file, [self.format.single_file], self.format.shard_glob
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
                specs.update(self.format.expert_tensor_specs(base, proj, n, k, h, self.activation_use_clip))
        if mc.shared_intermediate_size:
            for proj in EXPERT_PROJECTIONS:
                n, k = mc.shared_projection_shape(proj)
                base = names.shared_weight(layer, proj)
                info = self.reader.infos.get(f"{base}.weight")
                if info is not None and info.dtype == torch.int8:
                    for suffix, spec in self.format.linear_specs(n, k).items():
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
            problems.add("config.json: hidden_size and moe_intermediate_size must be even for int4 pairs")
            return
        covered: set[str] = set()
        expert_tensors: set[str] = set()
        for layer in self.moe_layers:
            specs = self.expected_layer_tensors(layer)
            covered.update(specs)
            for name, spec in specs.items():
                self._check_spec(name, spec, problems)
            prefix = mc.names.layer_prefix(layer) + "."
            for name in self.reader.infos:
                if name.startswith(prefix) and name not in specs:
                    problems.add(f"unexpected tensor {name!r} in MoE layer {layer}")
            expert_root = f"{prefix}{mc.names.experts}."
            expert_tensors.update(name for name in specs if name.startswith(expert_root))
        problems.items.extend(self.format.metadata_problems(mc, self.reader.infos, self.metadata, expert_tensors))
        # W8A8 linears elsewhere (attention, dense MLPs) need their scales too.
        for name, info in self.reader.infos.items():
            if name in covered or not name.endswith(".weight") or info.dtype != torch.int8 or len(info.shape) != 2:
                continue
            base = name[: -len(".weight")]
            n, k = info.shape
            for suffix, spec in self.format.linear_specs(n, k).items():
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

    def load_moe_layer_tensors(self, layer: int) -> QuantizedMoELayer:
        """Load and validate one MoE layer's tensors; raise :class:`CheckpointError` on any defect."""
        return self._read_checked(layer, self._read_moe_layer)

    def load_router(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The router of MoE layer ``layer``: its weight ``[E, H]`` (as stored) and, for ``noaux_tc``
        routing, the fp32 ``e_score_correction_bias`` ``[E]`` (else ``None``); value-checked
        whatever ``validate`` the checkpoint was opened with. Raises :class:`CheckpointError`
        naming the tensor."""
        return self._read_checked(layer, self._read_router)

    def _read_checked(self, layer: int, read):
        if layer not in self.moe_layers:
            raise CheckpointError(f"layer {layer} has no W4A8 experts; W4A8 MoE layers are {self.moe_layers}")
        problems = _Problems()
        out = read(layer, problems)
        problems.raise_if_any(self.path)
        return out

    def _read_router(self, layer: int, problems: _Problems) -> tuple[torch.Tensor, torch.Tensor | None]:
        mc = self.model_config
        base = f"{mc.names.layer_prefix(layer)}.{mc.names.router}"
        router = self.reader.get(f"{base}.weight")
        if not bool(torch.isfinite(router).all()):
            problems.add(f"tensor '{base}.weight' holds NaN or Inf")
        correction = None
        if mc.routing.method == "noaux_tc":
            correction = self.reader.get(f"{base}.e_score_correction_bias").to(torch.float32)
            if not bool(torch.isfinite(correction).all()):
                problems.add(f"tensor '{base}.e_score_correction_bias' holds NaN or Inf")
        return router, correction

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
        get = self.reader.get
        for expert in range(e):
            for proj in EXPERT_PROJECTIONS:
                base = names.expert_weight(layer, expert, proj)
                loaded = self.format.load_expert_projection(base, proj, get, problems.items, self.activation_use_clip)
                if loaded.alpha is not None:
                    alpha[expert] = loaded.alpha
                if not keep:
                    continue
                packed[proj][expert] = loaded.weight
                if loaded.scale is not None:
                    scales[proj][expert] = loaded.scale
            if not keep:
                self.reader.close()
        router, correction = self._read_router(layer, problems)
        shared = None
        shared_gate = None
        if mc.shared_intermediate_size:
            shared = {}
            for proj in EXPERT_PROJECTIONS:
                base = names.shared_weight(layer, proj)
                w = self.reader.get(f"{base}.weight")
                if w.dtype == torch.int8:
                    shared[proj] = (w, self.format.load_scale(f"{base}.weight_scale", get, problems.items))
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
            "format": self.format.name,
            "quant_method": self.quant_method,
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
