"""The distillation loop: one teacher into one student of the target architecture.

The student starts from ``_pretrained_`` and is classified with the task's frozen zero-shot head
(the head ``CLIPClassificationMixin`` builds); all of the student's vision parameters are trained,
the head, projection and logit scale are not. Each step draws a batch of training images (an
epoch-wise random permutation), streamed from the split by a ``DataLoader`` (never the whole split
in memory, see :mod:`.stream`), applies the same random augmentation to the teacher's and the
student's view, and minimises :func:`~.losses.distillation_objective` with AdamW under a warm-up +
cosine schedule.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from statsmerge_plugin.validation import check_choice, check_int, check_positive

from .augment import AUGMENTATIONS, apply_augmentation, sample_augmentation
from .losses import distillation_objective
from .stream import LabelledPairs, PairedViews, TeacherMemo, step_loader, used_positions


@dataclass(frozen=True)
class DistillOptions:
    """Every knob of one distillation run (all of them enter the student cache key).

    Attributes:
        temperature: softmax temperature ``T`` of the KL term (paper: 4).
        alpha: weight of the cross-entropy on labels (paper: 0.7); used only with ``use_labels``.
        use_labels: ``False`` (default): label-free KL only. ``True``: the paper's
            ``alpha * CE + (1 - alpha) * T^2 * KL`` with the train split's labels.
        max_steps: optimiser steps.
        lr: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_fraction: fraction of the steps with a linear warm-up (then cosine decay to 0).
        batch_size: training images per step.
        augmentation: ``none``, ``flip``, ``crop`` or ``flip_crop``.
        crop_fraction: maximal crop offset as a fraction of the image size.
        seed: seeds batch order and augmentation.
    """

    temperature: float = 4.0
    alpha: float = 0.7
    use_labels: bool = False
    max_steps: int = 300
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    batch_size: int = 64
    augmentation: str = "none"
    crop_fraction: float = 0.125
    seed: int = 0

    def __post_init__(self):
        check_positive("temperature", self.temperature)
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(
                f"invalid value {self.alpha!r} for option `alpha`: expected 0 <= alpha <= 1"
            )
        if not isinstance(self.use_labels, bool):
            raise ValueError(
                f"invalid value {self.use_labels!r} for option `use_labels`: expected a bool"
            )
        check_int("max_steps", self.max_steps)
        check_int("batch_size", self.batch_size)
        check_int("seed", self.seed, minimum=0)
        check_positive("lr", self.lr)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive("warmup_fraction", self.warmup_fraction, allow_zero=True)
        check_positive("crop_fraction", self.crop_fraction, allow_zero=True)
        if self.crop_fraction >= 0.5 or self.warmup_fraction >= 1:
            raise ValueError("options `crop_fraction` must be < 0.5 and `warmup_fraction` < 1")
        check_choice("augmentation", self.augmentation, AUGMENTATIONS)

    def key(self) -> Dict:
        """The options that determine the student (``alpha`` only matters with labels)."""
        d = asdict(self)
        if not self.use_labels:
            d.pop("alpha")
        return d


def warmup_cosine(step: int, total: int, warmup_fraction: float) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to zero."""
    warmup = max(1, int(warmup_fraction * total)) if warmup_fraction > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def batch_indices(
    n: int, batch_size: int, steps: int, generator: torch.Generator
) -> List[torch.Tensor]:
    """``steps`` batches from successive random permutations of ``range(n)`` (epoch-wise)."""
    batch_size = min(batch_size, n)
    order: List[torch.Tensor] = []
    need = steps * batch_size
    while sum(len(p) for p in order) < need:
        order.append(torch.randperm(n, generator=generator))
    flat = torch.cat(order)[:need]
    return list(flat.view(steps, batch_size))


def plan_batches(n: int, options: DistillOptions, steps: int):
    """The positions of every step's batch (seeded by ``options.seed``) and the generator, which
    then draws the augmentations. Deterministic: the cache key and the training loop agree."""
    generator = torch.Generator().manual_seed(options.seed)
    return batch_indices(n, options.batch_size, steps, generator), generator


def backward_in_chunks(
    chunk_loss: Callable[[slice], torch.Tensor], batch_size: int, chunk: Optional[int] = None
) -> float:
    """Back-propagate a batch's mean loss chunk by chunk; returns the batch's loss.

    ``chunk_loss(part)`` is the mean loss of the images ``part``; each chunk's loss is weighted by
    its share of the batch, so the accumulated gradients are those of the whole batch's mean loss
    while only one chunk's activations are alive. ``chunk=None``: the whole batch at once.
    """
    size = batch_size if chunk is None else min(chunk, batch_size)
    total = 0.0
    for start in range(0, batch_size, size):
        part = slice(start, min(start + size, batch_size))
        loss = chunk_loss(part) * ((part.stop - part.start) / batch_size)
        loss.backward()
        total += float(loss.detach())
    return total


@dataclass
class DistillRun:
    """What one distillation did.

    Attributes:
        losses: the loss of every step.
        step_seconds: wall time of every step (loading and processing its batch included).
        images_used: distinct training images the steps used.
        teacher_labelled: images the teacher labelled (each once without augmentation; with
            augmentation every augmented view of every step).
    """

    losses: List[float]
    step_seconds: List[float]
    images_used: int
    teacher_labelled: int


def distill(
    student: nn.Module,
    student_logits: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    teacher_logits: Callable[[torch.Tensor], torch.Tensor],
    views: PairedViews,
    options: DistillOptions,
    steps: Optional[int] = None,
    device=None,
    num_workers: int = 0,
    micro_batch_size: Optional[int] = None,
    desc: str = "distill",
    progress: bool = True,
) -> DistillRun:
    """Train ``student`` in place to match ``teacher_logits``, streaming the training images.

    Each step's batch is loaded, processed into both views and moved to ``device`` by a
    ``DataLoader`` (:func:`~.stream.step_loader`), so memory holds one batch whatever the split's
    size; the teacher labels an image the first time it is used (:class:`~.stream.TeacherMemo`),
    or every augmented view when augmenting.

    Args:
        student: the student vision model (its parameters are trained).
        student_logits: ``f(student, pixels) -> [B, C]`` (the frozen zero-shot head).
        teacher_logits: ``f(pixels) -> [B, C]`` from the teacher's own head (no gradient).
        views: the training images as both processors make them: :class:`~.stream.PairedViews`,
            or :class:`~.stream.LabelledPairs` exactly when ``options.use_labels``.
        options: the distillation options.
        steps: overrides ``options.max_steps`` (``fast_dev_run``).
        device: where the batches go (default: the student's device).
        num_workers: ``DataLoader`` worker processes.
        micro_batch_size: run forward and backward on chunks of this many images and accumulate
            their gradients (the same step; activation memory of a chunk, not of the batch);
            ``None``: the whole batch at once.
    """
    labelled = isinstance(views, LabelledPairs)
    if options.use_labels != labelled:
        raise ValueError(
            "labelled views must be given exactly when `use_labels` is true "
            f"(use_labels={options.use_labels}, labelled views: {labelled})"
        )
    steps = options.max_steps if steps is None else steps
    device = torch.device(device) if device is not None else next(student.parameters()).device
    batches, generator = plan_batches(len(views), options, steps)
    loader = step_loader(views, batches, num_workers, pin_memory=device.type == "cuda")
    memo = TeacherMemo(teacher_logits) if options.augmentation == "none" else None
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, steps, options.warmup_fraction)
    )
    student.train()
    losses: List[float] = []
    seconds: List[float] = []
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    start = time.perf_counter()
    for batch in loader:
        student_px, teacher_px, positions = (t.to(device, non_blocking=True) for t in batch[:3])
        labels = batch[3].to(device, non_blocking=True) if labelled else None
        augment = sample_augmentation(
            len(positions), options.augmentation, options.crop_fraction, generator
        )
        xs = apply_augmentation(student_px, augment)
        if memo is not None:
            target = memo.targets(positions, teacher_px)
        else:
            target = teacher_logits(apply_augmentation(teacher_px, augment))

        def chunk_loss(part: slice) -> torch.Tensor:
            return distillation_objective(
                student_logits(student, xs[part]),
                target[part],
                options.temperature,
                options.alpha,
                None if labels is None else labels[part],
            )

        optimizer.zero_grad(set_to_none=True)
        losses.append(backward_in_chunks(chunk_loss, len(xs), micro_batch_size))
        optimizer.step()
        scheduler.step()
        seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    student.eval()
    return DistillRun(
        losses=losses,
        step_seconds=[round(s, 4) for s in seconds],
        images_used=len(used_positions(batches)),
        teacher_labelled=len(memo) if memo is not None else steps * len(batches[0]),
    )
