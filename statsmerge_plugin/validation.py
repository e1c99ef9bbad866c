"""Checks that run before any long work, each raising one clear error that names the culprit."""

from __future__ import annotations

from typing import Dict, Iterable, Mapping

import torch
from torch import nn


def check_choice(option: str, value, choices: Iterable) -> None:
    """Raise ``ValueError`` naming ``option`` if ``value`` is not one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(
            f"invalid value {value!r} for option `{option}`: expected one of {choices}"
        )


def check_positive(option: str, value, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(
            f"invalid value {value!r} for option `{option}`: expected a number {bound}"
        )


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
    from fusion_bench.tasks.clip_classification import (
        CLIPTemplateFactory,
        get_classnames_and_templates,
    )

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
    """Same parameter names and shapes as the base model."""
    check_same_shapes(
        base_name,
        {n: tuple(t.shape) for n, t in base.items()},
        model_name,
        {n: tuple(t.shape) for n, t in other.items()},
    )


def check_finite(model_name: str, state: Mapping[str, torch.Tensor]) -> None:
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"model {model_name!r}: parameter {name!r} contains NaN or inf values")


# --- generic helpers added for ProDistill (append-only) -------------------------------------------


def check_int(option: str, value, minimum: int = 1) -> None:
    """Raise ``ValueError`` naming ``option`` unless ``value`` is an ``int`` >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"invalid value {value!r} for option `{option}`: expected an integer >= {minimum}"
        )


def check_finite_number(option: str, value) -> None:
    """Raise ``ValueError`` naming ``option`` unless ``value`` is a finite real number."""
    import math

    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value):
        raise ValueError(f"invalid value {value!r} for option `{option}`: expected a finite number")


def check_same_groups(
    base_name: str,
    base_groups: Mapping,
    model_name: str,
    groups: Mapping,
    what: str = "block",
) -> None:
    """Each group (e.g. transformer block index → local parameter names) of ``model_name`` must have
    exactly the names of the same group of ``base_name``; the error names the model and the group.
    """
    for key in sorted(set(base_groups) | set(groups)):
        if key not in groups:
            raise ValueError(f"model {model_name!r} has no {what} {key}, which {base_name!r} has")
        if key not in base_groups:
            raise ValueError(f"model {model_name!r} has a {what} {key}, which {base_name!r} lacks")
        missing = sorted(set(base_groups[key]) - set(groups[key]))
        extra = sorted(set(groups[key]) - set(base_groups[key]))
        if missing or extra:
            raise ValueError(
                f"model {model_name!r}, {what} {key}: parameter names differ from {base_name!r}: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
            )


def check_same_shapes(
    base_name: str,
    base_shapes: Mapping[str, tuple],
    model_name: str,
    shapes: Mapping[str, tuple],
) -> None:
    """Like :func:`check_compatible`, on ``{name: shape}`` maps (no tensor data needed)."""
    missing = sorted(set(base_shapes) - set(shapes))
    extra = sorted(set(shapes) - set(base_shapes))
    if missing or extra:
        raise ValueError(
            f"model {model_name!r} does not have the parameters of {base_name!r}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    for name, shape in base_shapes.items():
        if tuple(shapes[name]) != tuple(shape):
            raise ValueError(
                f"model {model_name!r}: parameter {name!r} has shape {tuple(shapes[name])}, "
                f"{base_name!r} has {tuple(shape)}"
            )
