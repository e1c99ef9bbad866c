"""Checks that run before any long work, each raising one clear error that names the culprit."""

from __future__ import annotations

from typing import Dict, Iterable, Mapping

import torch
from torch import nn


def check_choice(option: str, value, choices: Iterable) -> None:
    """Raise ``ValueError`` naming ``option`` if ``value`` is not one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"invalid value {value!r} for option `{option}`: expected one of {choices}")


def check_positive(option: str, value, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"invalid value {value!r} for option `{option}`: expected a number {bound}")


def check_pool_models(modelpool, min_models: int = 2) -> None:
    """The pool must have ``_pretrained_`` and at least ``min_models`` task models."""
    if not modelpool.has_pretrained:
        raise ValueError(
            "the model pool has no `_pretrained_` model: merging needs the common base model "
            f"(pool models: {modelpool.all_model_names})"
        )
    if len(modelpool.model_names) < min_models:
        raise ValueError(
            f"merging needs at least {min_models} task models, the pool has "
            f"{len(modelpool.model_names)}: {modelpool.model_names}"
        )


def check_task_classnames(tasks: Iterable[str]) -> None:
    """Every task must have FusionBench class names and templates (its zero-shot head needs them)."""
    from fusion_bench.tasks.clip_classification import CLIPTemplateFactory, get_classnames_and_templates

    for task in tasks:
        try:
            classnames, templates = get_classnames_and_templates(task)
        except Exception as err:  # FusionBench raises ValueError / KeyError / ImportError here
            available = sorted(CLIPTemplateFactory.get_available_datasets())
            raise ValueError(
                f"task {task!r} has no class names registered with FusionBench "
                f"({type(err).__name__}: {err}); known tasks include {available[:12]}..."
            ) from err
        if not classnames or not templates:
            raise ValueError(f"task {task!r} has an empty class-name or template list")


def trainable_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The merged parameters of a model: every parameter tensor (buffers are taken from the base)."""
    return {name: p.detach() for name, p in model.named_parameters()}


def check_compatible(
    base_name: str,
    base: Mapping[str, torch.Tensor],
    model_name: str,
    other: Mapping[str, torch.Tensor],
) -> None:
    """Same parameter names and shapes as the base model, and finite values."""
    missing = sorted(set(base) - set(other))
    extra = sorted(set(other) - set(base))
    if missing or extra:
        raise ValueError(
            f"model {model_name!r} does not have the parameters of {base_name!r}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    for name, tensor in base.items():
        if other[name].shape != tensor.shape:
            raise ValueError(
                f"model {model_name!r}: parameter {name!r} has shape {tuple(other[name].shape)}, "
                f"{base_name!r} has {tuple(tensor.shape)}"
            )


def check_finite(model_name: str, state: Mapping[str, torch.Tensor]) -> None:
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"model {model_name!r}: parameter {name!r} contains NaN or inf values")
