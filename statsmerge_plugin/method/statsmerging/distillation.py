"""Task-specific teacher distillation (StatsMerging §3.3): the label-free training signal.

Teacher k is fine-tuned model k with task k's frozen zero-shot head; it labels its own task's unlabelled
images. The merged model is trained to agree with it, through either

* ``ce_hard`` (paper default): cross-entropy against the teacher's one-hot pseudo-label argmax, or
* ``kl_soft``: ``T^2 * KL(softmax(t / T) || softmax(s / T))`` (the paper mentions KL without a
  temperature; ``T`` is an option).

Each task's loss is a mean over its batch; the tasks' losses are then combined (``task_weighting``):

* ``sum`` (paper, spec §3 step E): the plain sum;
* ``relative``: each task's loss divided by its value at the start of training (the initial merge on
  all of the task's training images), so that every task starts at 1 and a point of loss gained on a
  hard task no longer pays for a larger relative loss on an easy one;
* ``confidence``: every image's loss weighted by its teacher's confidence (max softmax probability),
  so images (and tasks) whose teachers are unsure count less.

The merged model's logits for all tasks come from ONE forward pass of the concatenated images
(:func:`task_logits`), each task's head applied to its slice; every op of the encoder is per image, so
this equals one forward per task (tested) at a fraction of the cost.
"""

from __future__ import annotations

from typing import Callable, Dict, Literal, Mapping, Optional

import torch
import torch.nn.functional as F

DistillationLoss = Literal["ce_hard", "kl_soft"]
DISTILLATION_LOSSES = ("ce_hard", "kl_soft")
TASK_WEIGHTINGS = ("sum", "relative", "confidence")


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


def per_image_distillation_loss(
    kind: DistillationLoss,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The distillation loss of every image, ``[B]`` (its mean is :func:`distillation_loss`)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    if kind == "ce_hard":
        return F.cross_entropy(student_logits, teacher_logits.argmax(-1), reduction="none")
    if kind == "kl_soft":
        t = temperature
        log_p = F.log_softmax(teacher_logits / t, dim=-1)
        log_q = F.log_softmax(student_logits / t, dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1) * (t * t)
    raise ValueError(f"invalid distillation loss {kind!r}: expected one of {DISTILLATION_LOSSES}")


def distillation_loss(
    kind: DistillationLoss,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The batch mean of :func:`per_image_distillation_loss`."""
    return per_image_distillation_loss(kind, student_logits, teacher_logits, temperature).mean()


def teacher_confidence(teacher_logits: torch.Tensor) -> torch.Tensor:
    """The teacher's max softmax probability per image, ``[B]`` in ``(1/C, 1]``."""
    return torch.softmax(teacher_logits.float(), dim=-1).amax(-1)


def task_loss(
    kind: DistillationLoss,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    weighting: str = "sum",
) -> torch.Tensor:
    """One task's loss: the batch mean, of confidence-weighted losses with ``confidence``."""
    losses = per_image_distillation_loss(kind, student_logits, teacher_logits, temperature)
    if weighting == "confidence":
        losses = losses * teacher_confidence(teacher_logits).to(losses)
    return losses.mean()


def combine_task_losses(
    losses: Mapping[str, torch.Tensor],
    weighting: str = "sum",
    start: Optional[Mapping[str, float]] = None,
) -> torch.Tensor:
    """The objective: the sum of the tasks' losses, each divided by ``start[task]`` with
    ``relative`` (its loss at the start of training, > 0)."""
    if weighting not in TASK_WEIGHTINGS:
        raise ValueError(
            f"invalid value {weighting!r} for option `task_weighting`: expected one of "
            f"{TASK_WEIGHTINGS}"
        )
    if weighting == "relative":
        if start is None or set(start) != set(losses):
            raise ValueError("task_weighting=relative needs every task's loss at the start")
        return sum(loss / start[task] for task, loss in losses.items())
    return sum(losses.values())


def task_logits(
    encode: Callable[[torch.Tensor], torch.Tensor],
    head: Callable[[str, torch.Tensor], torch.Tensor],
    images: Mapping[str, torch.Tensor],
    one_forward: bool = True,
) -> Dict[str, torch.Tensor]:
    """Every task's logits ``head(task, encode(images[task]))``.

    ``one_forward=True`` encodes the concatenation of all tasks' images in one call and applies each
    task's head to its slice; ``False`` encodes each task's images separately (one call per task).
    Both give the same logits when ``encode`` treats images independently.
    """
    if not one_forward:
        return {task: head(task, encode(x)) for task, x in images.items()}
    sizes = [len(x) for x in images.values()]
    features = encode(torch.cat(list(images.values())))
    return {task: head(task, f) for task, f in zip(images, features.split(sizes))}


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Fraction of images where the student's argmax is the teacher's (label-free accuracy)."""
    return float((student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean())
