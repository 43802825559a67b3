"""Shared fixtures: adversarial input generators."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# Triton decides at its first import whether kernels run in its interpreter; anything in the
# session may import it (torch, transformers), so set the flag here, before all of them, where
# there is no GPU: the triton backend's tests then run its kernels on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def cpu_backend_or_skip(isa: str = "native"):
    """The native CPU backend for ``isa``. Skips only where the machine cannot build the kernel
    at all; once the native build works (a compiler and AVX2 are there), every lower ISA
    variant must build too."""
    from w4a8moe.kernels import cpu as cpu_mod

    try:
        cpu_mod.load_kernel("native")
    except cpu_mod.KernelBuildError as exc:
        pytest.skip(f"the CPU kernel cannot be built here: {exc}")
    return cpu_mod.CpuBackend(isa)


def adversarial_rows(m: int, k: int, seed: int = 0) -> torch.Tensor:
    """Rows that stress per-row quantization: random, outliers, zeros, all-equal, tiny, huge, ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    kinds = [
        lambda r: r,
        lambda r: torch.where(torch.arange(k) == k // 3, r * 1000.0, r),  # one outlier column
        lambda r: torch.zeros(k),
        lambda r: torch.full((k,), -2.5),
        lambda r: r * 1e-30,
        lambda r: r * 1e30,
        lambda r: torch.arange(k, dtype=torch.float32) - k / 2,  # exact half-way values after scaling
        lambda r: torch.where(torch.arange(k) == 0, torch.tensor(127.0), torch.round(r * 40) + 0.5),
    ]
    for i in range(m):
        x[i] = kinds[i % len(kinds)](x[i])
    return x


def random_hf_model(model_type: str = "deepseek_v3", seed: int = 0, **overrides):
    """A random bf16 transformers model of a tiny ``model_type`` config (weights large enough
    to matter when quantized) and that config: ``(model, cfg)``."""
    from transformers import AutoModelForCausalLM

    from w4a8moe.models.loading import transformers_config
    from w4a8moe.models.synthetic import tiny_config

    cfg = tiny_config(model_type, initializer_range=0.08, **overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(transformers_config(cfg), dtype=torch.bfloat16), cfg


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
