"""Task-specific teacher distillation (StatsMerging §3.3): the label-free training signal.

Teacher k is fine-tuned model k with task k's frozen zero-shot head; it labels its own task's unlabelled
images. The merged model is trained to agree with it, through either

* ``ce_hard`` (paper default): cross-entropy against the teacher's one-hot pseudo-label argmax, or
* ``kl_soft``: ``T^2 * KL(softmax(t / T) || softmax(s / T))`` (the paper mentions KL without a
  temperature; ``T`` is an option).

The per-task losses are summed over tasks (spec §3 step E), each a mean over its batch.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

DistillationLoss = Literal["ce_hard", "kl_soft"]
DISTILLATION_LOSSES = ("ce_hard", "kl_soft")


def hard_pseudo_label_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of the student against the teacher's argmax labels."""
    return F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))


def soft_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``T^2 * KL(teacher || student)`` at temperature ``T``, averaged over the batch."""
    t = temperature
    return (
        F.kl_div(
            F.log_softmax(student_logits / t, dim=-1),
            F.log_softmax(teacher_logits / t, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        * t
        * t
    )


def distillation_loss(
    kind: DistillationLoss,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    if kind == "ce_hard":
        return hard_pseudo_label_loss(student_logits, teacher_logits)
    if kind == "kl_soft":
        return soft_distillation_loss(student_logits, teacher_logits, temperature)
    raise ValueError(f"invalid distillation loss {kind!r}: expected one of {DISTILLATION_LOSSES}")
