"""The compute dtype of a merge: the pool's dtype by default, float32 master copies of what is trained.

FusionBench pools may load their models in half precision (``torch_dtype: bfloat16`` in a model's
config, as FusionBench's own ``load_model`` docstring shows, and every ``CausalLMPool`` of 7B models).
Both methods then keep the weights, task vectors, merged tensors and activations in that dtype and
hold only what is trained (StatsMerging's learner and coefficients, ProDistill's coefficients), their
optimiser state and accumulators (losses, gradients folded into the coefficients) in float32;
per-tensor arithmetic (``θ0 + Σ λ τ``) is done in float32 and rounded once.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

#: the values of the ``compute_dtype`` options (``null``: the pool's dtype)
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_compute_dtype(option: str, value: Optional[str]) -> None:
    """``value`` is ``None`` or a key of :data:`COMPUTE_DTYPES`; the error names ``option``."""
    if value is not None and value not in COMPUTE_DTYPES:
        raise ValueError(
            f"invalid value {value!r} for option `{option}`: expected null (the pool's dtype) or "
            f"one of {', '.join(COMPUTE_DTYPES)}"
        )


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s floating-point parameters (float32 if it has none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def resolve_compute_dtype(value: Optional[str], pool_dtype: torch.dtype) -> torch.dtype:
    """The dtype a run computes in: ``value``'s, or the pool's when ``value`` is ``None``."""
    return pool_dtype if value is None else COMPUTE_DTYPES[value]


def is_low_precision(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)
