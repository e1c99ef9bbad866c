R"""Distillation losses of the heterogeneous mode (StatsMerging §4, following MergeDistill).

Paper (with ground-truth labels y, ``T = 4``, ``alpha = 0.7``):

$$ \mathcal{L} = \alpha\,\mathrm{CE}(y, s) + (1 - \alpha)\,T^2\,
   \mathrm{KL}\big(\mathrm{softmax}(t / T)\,\|\,\mathrm{softmax}(s / T)\big) $$

Default here is the label-free special case ``alpha = 0`` (KL only), which needs no labels at all:
:func:`label_free_loss` has no label argument, so the label-free path cannot read one.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from statsmerge_plugin.method.statsmerging.distillation import soft_distillation_loss


def label_free_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0
) -> torch.Tensor:
    """``T^2 * KL(softmax(t / T) || softmax(s / T))``, averaged over the batch."""
    _check_shapes(student_logits, teacher_logits)
    return soft_distillation_loss(student_logits, teacher_logits, temperature)


def supervised_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 4.0,
    alpha: float = 0.7,
) -> torch.Tensor:
    """The paper's ``alpha * CE(y, s) + (1 - alpha) * T^2 * KL(t || s)``."""
    _check_shapes(student_logits, teacher_logits)
    if labels.shape != student_logits.shape[:1]:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match a batch of "
            f"{student_logits.shape[0]} logits"
        )
    ce = F.cross_entropy(student_logits, labels)
    kl = soft_distillation_loss(student_logits, teacher_logits, temperature)
    return alpha * ce + (1.0 - alpha) * kl


def distillation_objective(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    alpha: float,
    labels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`supervised_loss` when ``labels`` are given, else :func:`label_free_loss`."""
    if labels is None:
        return label_free_loss(student_logits, teacher_logits, temperature)
    return supervised_loss(student_logits, teacher_logits, labels, temperature, alpha)


def _check_shapes(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape: the teacher's head must have one "
            "output per class of the task"
        )
