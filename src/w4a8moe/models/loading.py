"""Whole-model loading: a W4A8 checkpoint as a runnable transformers causal LM.

The model skeleton is built from the checkpoint's ``config.json`` on the meta device, so no
bf16 expert weight is ever materialised. Then:

- each W4A8 MoE block (``model.layers.L.mlp``) is replaced by the project's
  :class:`~w4a8moe.moe.W4A8MoE` inside :class:`W4A8MoEBlock`, which has the forward signature
  and return type of the transformers 5 MoE blocks (hidden states in, a tensor of the same
  shape and dtype out);
- every ``nn.Linear`` whose weight is int8 in the checkpoint becomes a
  :class:`~w4a8moe.moe.W8A8Linear` (with its float bias, if the family has one), and a
  dense MLP whose three projections are W8A8 becomes a :class:`~w4a8moe.moe.GatedMLP`
  (its activation rounded once, SPEC 1, as the engines run it);
- every remaining parameter and persistent buffer is loaded from the checkpoint.

Loading is strict: a model parameter without a checkpoint tensor, a checkpoint tensor that
nothing uses, or a shape mismatch raises :class:`~w4a8moe.errors.CheckpointError` naming the
tensor. The only tensors deliberately left unused are DeepSeek's multi-token-prediction
layers (``model.layers.N`` for N >= ``num_hidden_layers``), which transformers' model has no
place for either.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from w4a8moe.errors import CheckpointError, ConfigError
from w4a8moe.formats import Checkpoint, open_checkpoint
from w4a8moe.kernels import ExpertBackend
from w4a8moe.moe import GatedMLP, W4A8MoE, W8A8Linear

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe")
"""Families whose transformers classes :func:`load_model` has been checked against."""


class W4A8MoEBlock(nn.Module):
    """A :class:`W4A8MoE` in the place of a transformers MoE block (``decoder_layer.mlp``).

    transformers 5 MoE blocks (DeepSeek-V3, Qwen2/3-MoE, Mixtral, OLMoE) all take the
    normalised hidden states ``[batch, seq, H]`` and return one tensor of the same shape; this
    wrapper does the same, returning the input's dtype (the W4A8 layer itself computes in
    bf16 with fp32 accumulation).
    """

    def __init__(self, moe: W4A8MoE):
        super().__init__()
        self.moe = moe

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.moe(hidden_states).to(hidden_states.dtype)


def _meta_state(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(state_dict name, tensor)`` of the parameters and persistent buffers still on the meta
    device: those left to load by name. Read from the modules, not from ``state_dict()``,
    which would decode every W8A8 Linear's weight out of its kernel layout (see
    :class:`~w4a8moe.moe.W8A8Linear`)."""
    out = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        tensors = list(module._parameters.items()) + [
            (n, b) for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set]
        out.extend((prefix + n, t) for n, t in tensors if t is not None and t.is_meta)
    return out


def use_gated_mlps(model: nn.Module) -> list[str]:
    """Replace each transformers SiLU MLP whose gate/up/down projections are all W8A8 by a
    :class:`~w4a8moe.moe.GatedMLP` on the same projections; return the module paths replaced.

    transformers' MLP forms ``act_fn(gate(x)) * up(x)`` in bf16, rounding twice; the engines
    (and SPEC 1) round once.
    """
    probe = torch.linspace(-8.0, 8.0, 33)
    replaced = []
    for name, module in list(model.named_modules()):
        projections = [getattr(module, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
        act = getattr(module, "act_fn", None)
        if (not isinstance(module, GatedMLP) and all(isinstance(p, W8A8Linear) for p in projections)
                and callable(act) and torch.equal(act(probe), torch.nn.functional.silu(probe))):
            _set_submodule(model, name, GatedMLP(*projections))
            replaced.append(name)
    return replaced


class W8A8LinearWithBias(W8A8Linear):
    """A :class:`W8A8Linear` plus a float bias added after the int8 matmul (Qwen2 q/k/v)."""

    def __init__(self, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor,
                 backend: str | ExpertBackend | None = None):
        super().__init__(weight_q, weight_scale, backend)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.bias.to(torch.bfloat16)


def transformers_config(config: dict):
    """A transformers config object from a checkpoint's ``config.json`` minus quantization."""
    from transformers import AutoConfig

    clean = {k: v for k, v in config.items() if k != "quantization_config"}
    model_type = clean.pop("model_type")
    return AutoConfig.for_model(model_type, **clean)


def build_empty_model(config: dict, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The transformers causal LM of ``config`` with every parameter on the meta device."""
    from transformers import AutoModelForCausalLM

    hf_config = transformers_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    return model


def _get_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def _mtp_layers(ckpt: Checkpoint) -> set[int]:
    """DeepSeek multi-token-prediction layer indices present in the checkpoint (unused here)."""
    n = ckpt.model_config.num_hidden_layers
    extra = int(ckpt.config.get("num_nextn_predict_layers") or 0)
    return set(range(n, n + extra))


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2])
    return None


def _is_hf_moe_block(module: nn.Module | None) -> bool:
    return module is not None and hasattr(module, "experts") and hasattr(module, "gate")


def _init_non_persistent_buffers(model: nn.Module) -> None:
    """Materialise non-persistent buffers (rotary ``inv_freq``) with transformers' own init.

    They are computed in ``__init__``, which ran on the meta device, and are not stored in
    checkpoints; ``_init_weights`` is the code transformers itself uses to recompute them.
    """
    for module in model.modules():
        names = [n for n in getattr(module, "_non_persistent_buffers_set", ()) if getattr(module, n, None) is not None]
        if not names or not any(getattr(module, n).is_meta for n in names):
            continue
        for n in names:
            buf = getattr(module, n)
            module._buffers[n] = torch.empty(buf.shape, dtype=buf.dtype, device="cpu")
        with torch.no_grad():
            model._init_weights(module)
        still_meta = [n for n in names if getattr(module, n).is_meta]
        if still_meta:
            raise CheckpointError(f"cannot initialise buffers {still_meta} of {type(module).__name__}")


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device, checked to exist here (``"cuda"`` needs a visible GPU);
    :class:`~w4a8moe.errors.ConfigError` otherwise, which the command line prints."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a torch device ({exc})") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(device)!r} requested, but CUDA is not available on this machine")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif resolved.type != "cpu":
        raise ConfigError(f"device {str(device)!r}: only 'cpu' and 'cuda' are supported")
    return resolved


def load_model(
    path: str | Path,
    apply_alpha: bool = True,
    backend: str | ExpertBackend | None = None,
    validate: str = "full",
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load a W4A8 checkpoint (either format) as a transformers causal LM, ready for inference.

    ``apply_alpha=False`` ignores the learned activation clips, as upstream sglang does.
    ``backend`` picks the expert kernel backend (``None``: ``$W4A8MOE_BACKEND`` or the fastest
    available for ``device``: ``triton`` on CUDA). ``device`` (``"cpu"``, ``"cuda"``,
    ``"cuda:1"``) is where every tensor is placed as it is read: the routed experts stay
    packed there (4 bits per weight). ``validate`` is passed to :func:`~w4a8moe.formats.open_checkpoint`; the MoE
    layers are value-checked either way. Raises :class:`CheckpointError` naming the tensor for
    any missing, unexpected or mis-shaped tensor. The model is in eval mode, bf16.
    """
    device = resolve_device(device)
    ckpt = open_checkpoint(path, validate=validate)
    mc = ckpt.model_config
    if mc.model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{ckpt.path}: model_type {mc.model_type!r} has no whole-model loader; supported: {SUPPORTED_MODEL_TYPES}"
        )
    model = build_empty_model(ckpt.config)
    infos = ckpt.reader.infos
    used: set[str] = set()
    mtp = _mtp_layers(ckpt)

    # 1. MoE blocks. Every layer the model builds as MoE must be W4A8 in the checkpoint.
    hf_moe_layers = {
        i for i, layer in enumerate(model.model.layers) if _is_hf_moe_block(getattr(layer, "mlp", None))
    }
    ckpt_layers = set(ckpt.moe_layers) - mtp
    if hf_moe_layers != ckpt_layers:
        raise CheckpointError(
            f"{ckpt.path}: config.json makes layers {sorted(hf_moe_layers)} MoE, but the checkpoint has W4A8 "
            f"experts for layers {sorted(ckpt_layers)}"
        )
    for layer in sorted(ckpt_layers):
        moe = W4A8MoE.from_quantized(ckpt.load_moe_layer_tensors(layer), mc.routing, apply_alpha=apply_alpha,
                                     backend=backend, device=device)
        model.model.layers[layer].mlp = W4A8MoEBlock(moe)
        used.update(ckpt.expected_layer_tensors(layer))

    # 2. W8A8 linears: an int8 2-D weight outside the MoE blocks.
    for name, info in infos.items():
        if name in used or not name.endswith(".weight") or info.dtype != torch.int8:
            continue
        if _layer_of(name) in mtp:
            continue
        base = name[: -len(".weight")]
        target = _get_submodule(model, base)
        if not isinstance(target, nn.Linear):
            raise CheckpointError(f"tensor {name!r} is an int8 Linear weight, but the model has no Linear {base!r}")
        if info.shape != (target.out_features, target.in_features):
            raise CheckpointError(
                f"tensor {name!r}: shape {list(info.shape)}, the model's Linear expects "
                f"[{target.out_features}, {target.in_features}]"
            )
        linear_names = ckpt.format.linear_tensor_specs(base, *info.shape)
        for tensor_name in linear_names:
            if tensor_name not in infos:
                raise CheckpointError(f"missing tensor {tensor_name!r} of the W8A8 Linear {base!r}")
        weight = ckpt.reader.get(name).to(device)
        scale = ckpt.reader.get(f"{base}.weight_scale").to(device=device, dtype=torch.float32).reshape(-1)
        problems = ckpt.format.linear_problems(base, ckpt.reader.get)
        if problems:
            raise CheckpointError("; ".join(problems))
        used.update(linear_names)
        if target.bias is not None:
            bias_name = f"{base}.bias"
            if bias_name not in infos:
                raise CheckpointError(f"missing tensor {bias_name!r} (the model's Linear {base!r} has a bias)")
            bias = ckpt.reader.get(bias_name)
            if tuple(bias.shape) != (target.out_features,):
                raise CheckpointError(f"tensor {bias_name!r}: shape {list(bias.shape)}, expected [{target.out_features}]")
            used.add(bias_name)
            _set_submodule(model, base, W8A8LinearWithBias(weight, scale, bias.to(device=device, dtype=torch.bfloat16)))
        else:
            _set_submodule(model, base, W8A8Linear(weight, scale))

    # 3. Every other parameter and persistent buffer, by name.
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing: list[str] = []
    for name, tensor in _meta_state(model):
        if name == "lm_head.weight" and tied and name not in infos:
            continue  # tied to the embeddings below
        if name not in infos:
            missing.append(f"{name} ({str(tensor.dtype).replace('torch.', '')} {list(tensor.shape)})")
            continue
        info = infos[name]
        if tuple(info.shape) != tuple(tensor.shape):
            raise CheckpointError(f"tensor {name!r}: shape {list(info.shape)}, the model expects {list(tensor.shape)}")
        value = ckpt.reader.get(name)
        if not value.is_floating_point():
            raise CheckpointError(f"tensor {name!r}: expected a float tensor, found {value.dtype}")
        module_path, _, attr = name.rpartition(".")
        module = model.get_submodule(module_path) if module_path else model
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(value.to(device=device, dtype=tensor.dtype), requires_grad=False)
        else:
            module._buffers[attr] = value.to(device=device, dtype=tensor.dtype)
        used.add(name)
    if missing:
        raise CheckpointError(
            f"{ckpt.path}: {len(missing)} model tensor(s) missing from the checkpoint: " + ", ".join(missing[:20])
        )
    unused = sorted(n for n in infos if n not in used and _layer_of(n) not in mtp)
    if unused:
        raise CheckpointError(
            f"{ckpt.path}: {len(unused)} checkpoint tensor(s) not used by the {mc.model_type} model: "
            + ", ".join(repr(n) for n in unused[:20])
        )
    if tied and "lm_head.weight" not in infos:
        model.lm_head.weight = model.get_input_embeddings().weight
    _init_non_persistent_buffers(model)
    use_gated_mlps(model)
    if device.type != "cpu":
        model.to(device)  # the non-persistent buffers (rotary inv_freq), computed on the CPU
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"{ckpt.path}: model tensors left unloaded: {leftover[:20]}")
    model.eval()
    model.requires_grad_(False)
    model.w4a8moe_checkpoint = ckpt  # for callers that want format, clip flag, layer list
    return model
