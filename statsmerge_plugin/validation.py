"""Checks that run before any long work, each raising one clear error that names the culprit."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import nn


def check_choice(option: str, value, choices: Iterable) -> None:
    """Raise ``ValueError`` naming ``option`` if ``value`` is not one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(
            f"invalid value {value!r} for option `{option}`: expected one of {choices}"
        )


def check_bool(option: str, value) -> None:
    """Raise ``ValueError`` naming ``option`` unless ``value`` is ``True`` or ``False`` (not 0/1)."""
    if not isinstance(value, bool):
        raise ValueError(f"invalid value {value!r} for option `{option}`: expected true or false")


def check_positive(option: str, value, allow_none: bool = False, allow_zero: bool = False) -> None:
    """Raise ``ValueError`` naming ``option`` unless ``value`` is a finite number > 0 (or >= 0)."""
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(
            f"invalid value {value!r} for option `{option}`: expected a finite number {bound}"
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


def check_int(option: str, value, minimum: int = 1, allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming ``option`` unless ``value`` is an ``int`` >= ``minimum``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"invalid value {value!r} for option `{option}`: expected an integer >= {minimum}"
            + (" or null" if allow_none else "")
        )


def check_finite_number(option: str, value) -> None:
    """Raise ``ValueError`` naming ``option`` unless ``value`` is a finite real number."""
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


# --- reliability checks (issue 12): non-finite values during and after training ------------------


def check_finite_loss(
    method: str, loss: float, step: int, total_steps: int, where: str = ""
) -> None:
    """Stop training at the first non-finite loss, naming the step (1-based) and where it happened.

    Raises:
        FloatingPointError: when ``loss`` is NaN or infinite.
    """
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"{method}: the training loss is {loss} at step {step} of {total_steps}{where}; "
            "stopping before anything is saved or evaluated. Lower `lr`, or check the models and "
            "the options for extreme values."
        )


def check_finite_gradients(method: str, parameters: Iterable[torch.Tensor], step: int) -> None:
    """Raise ``FloatingPointError`` if any gradient is NaN/inf (under DDP every rank sees the same
    all-reduced gradients, so all ranks stop at the same step)."""
    for p in parameters:
        if p.grad is not None and not torch.isfinite(p.grad).all():
            raise FloatingPointError(
                f"{method}: non-finite gradients at step {step}; stopping before anything is saved "
                "or evaluated. Lower `lr`, or check the models and the options for extreme values."
            )


def check_finite_coefficients(
    method: str, coefficients: torch.Tensor, tasks: Sequence[str], columns: Sequence[str]
) -> None:
    """``coefficients[k, l]`` (task ``tasks[k]``, column ``columns[l]``) must all be finite.

    Raises:
        FloatingPointError: naming the first bad task and column.
    """
    bad = (~torch.isfinite(coefficients)).nonzero()
    if len(bad):
        k, l = (int(i) for i in bad[0])
        raise FloatingPointError(
            f"{method}: {len(bad)} learned coefficient(s) are NaN or inf (first: task "
            f"{tasks[k]!r}, {columns[l]!r}: {float(coefficients[k, l])}); nothing was saved or "
            "evaluated. Lower `lr`, or check the models and the options for extreme values."
        )


# --- model files: readable, same shapes, finite; streamed one group of tensors at a time ---------


def check_model_weights(
    base_name: str,
    reference_shapes: Mapping[str, tuple],
    model_name: str,
    reader,
    groups: Sequence[Sequence[str]],
) -> None:
    """Check one model through a block-wise ``reader`` (``shapes()``, ``read(names)``): the same
    parameter names and shapes as ``base_name``, and finite values, reading one group of tensors
    at a time so that memory stays one group wide. Unreadable files raise from the reader, naming
    the model and the file."""
    check_same_shapes(base_name, reference_shapes, model_name, reader.shapes())
    for group in groups:
        check_finite(model_name, reader.read(group))


# --- output locations: writable before the work starts, never overwritten silently --------------

#: Files and directories that a finished (or started) run leaves in its log dir: Hydra's, FusionBench's
#: and this package's. Any of them in the log dir of a new run means an earlier run would be clobbered.
RUN_ARTEFACTS = (
    "config.yaml",
    "hydra.yaml",
    "overrides.yaml",
    "program_report.json",
    "report.json",
    "report_table.md",
    "statsmerging",
    "prodistill_report.json",
    "prodistill_loss_curves.csv",
    "hetero",
)


def check_writable_dir(path, what: str) -> Path:
    """``path`` must be a directory that exists and is writable, or could be created.

    Probes the nearest existing ancestor with a temporary file (``os.access`` alone is wrong for root
    and read-only file systems). Nothing is created. Returns the absolute path.

    Raises:
        ValueError: naming ``what`` and the path.
    """
    path = Path(os.path.expanduser(str(path))).absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is an existing file, not a directory")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{what} {str(path)!r} cannot be created: {str(ancestor)!r} is a file")
    try:
        with tempfile.TemporaryFile(dir=ancestor, prefix=".write_probe_"):
            pass
    except OSError as err:
        raise ValueError(
            f"{what} {str(path)!r} is not writable ({str(ancestor)!r}: {err.strerror or err})"
        ) from err
    return path


def existing_artefacts(directory, names: Iterable[str] = RUN_ARTEFACTS) -> List[str]:
    """The entries of ``names`` that exist in ``directory`` (sorted)."""
    directory = Path(directory)
    return sorted(n for n in names if (directory / n).exists())


def format_log_dir_path(path: Optional[str], log_dir) -> Optional[str]:
    """FusionBench's ``{log_dir}`` placeholder in ``merged_model_save_path``/``report_save_path``
    (``None`` when there is no path, or a placeholder but no log dir)."""
    if path is None:
        return None
    path = str(path)
    if "{log_dir}" in path:
        if log_dir is None:
            return None  # no log dir to resolve it with: nothing to check
        path = path.format(log_dir=log_dir)
    return path


def check_output_locations(
    *,
    log_dir=None,
    merged_model_save_path: Optional[str] = None,
    report_save_path: Optional[str] = None,
    overwrite: bool = False,
    artefacts: Iterable[str] = RUN_ARTEFACTS,
    overwrite_hint: str = "`method.overwrite=true`",
) -> None:
    """Before any work: every output location is writable, and no earlier output would be replaced.

    Args:
        log_dir: the run's log dir (``None``: no log dir).
        merged_model_save_path: where the merged model is saved (a directory; ``{log_dir}`` allowed).
        report_save_path: where the evaluation report is written (``{log_dir}`` allowed).
        overwrite: allow replacing earlier outputs (never a file where a directory is expected).
        artefacts: names in ``log_dir`` that belong to an earlier run.
        overwrite_hint: how the user turns ``overwrite`` on (for the message).

    Raises:
        ValueError: naming the location and the files that would be overwritten.
    """
    again = f"choose another location, or pass {overwrite_hint} to replace them"
    if log_dir is not None:
        log_dir = check_writable_dir(log_dir, "log dir (`path.log_dir`)")
        found = existing_artefacts(log_dir, artefacts)
        if found and not overwrite:
            raise ValueError(
                f"log dir {str(log_dir)!r} already holds the outputs of an earlier run ({found}); "
                f"refusing to overwrite them: {again}"
            )
    merged = format_log_dir_path(merged_model_save_path, log_dir)
    if merged:
        path = check_writable_dir(merged, "`merged_model_save_path`")
        if path.is_dir() and any(path.iterdir()) and not overwrite:
            raise ValueError(
                f"`merged_model_save_path` {str(path)!r} already exists and is not empty; refusing "
                f"to overwrite it: {again}"
            )
    report = format_log_dir_path(report_save_path, log_dir)
    if report:
        path = Path(report).absolute()
        if path.is_dir():
            raise ValueError(f"`report_save_path` {str(path)!r} is a directory, not a file")
        check_writable_dir(path.parent, "the directory of `report_save_path`")
        if path.exists() and not overwrite:
            raise ValueError(
                f"`report_save_path` {str(path)!r} already exists; refusing to overwrite it: {again}"
            )
