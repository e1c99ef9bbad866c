"""Each task's unlabelled held-out images: loaded, held as one tensor or streamed a batch at a time,
and split for model selection. The test split is never read (:mod:`statsmerge_plugin.data`)."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from statsmerge_plugin.data import TestSplitGuard, held_out_images, stack_images


class StreamedImages:
    """A task's unlabelled images processed when used, a batch at a time, instead of held as one
    tensor: what StatsMerging uses for ``num_unlabelled_per_task: null`` (the whole held-out split,
    e.g. SVHN's 7.3k validation images, 4.4 GB at 224 px).

    ``batch(idx)`` processes those images (the values ``stack_images`` would hold: the same
    processing, image by image), ``split(n)`` iterates over all of them in batches of ``n``,
    ``subset(idx)`` selects some without processing any.
    """

    def __init__(self, images, positions: Optional[Sequence[int]] = None):
        self.images = images
        self.positions = list(range(len(images))) if positions is None else list(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def batch(self, idx) -> torch.Tensor:
        return torch.stack([self.images[self.positions[int(i)]] for i in idx])

    def subset(self, idx) -> "StreamedImages":
        return StreamedImages(self.images, [self.positions[int(i)] for i in idx])

    def split(self, size: int):
        for first in range(0, len(self), size):
            yield self.batch(range(first, min(first + size, len(self))))


def take(images, idx) -> torch.Tensor:
    """The images at ``idx`` of a stacked tensor or of :class:`StreamedImages`, as a tensor."""
    return images.batch(idx) if isinstance(images, StreamedImages) else images[idx]


def select(images, idx):
    """The images at ``idx``, of the same kind (a tensor, or :class:`StreamedImages`)."""
    return images.subset(idx) if isinstance(images, StreamedImages) else images[idx]


def load_unlabelled(modelpool, tasks: List[str], processor, options, guard: TestSplitGuard):
    """Each task's unlabelled held-out images and what was read (split, paths, fingerprint, rows):
    ``num_unlabelled_per_task`` images as one host tensor, or, with ``None``, the whole split as
    :class:`StreamedImages` (processed a batch at a time when used). ``options`` are the run's
    :class:`~.options.StatsMergingOptions`."""
    o = options
    selecting = o.model_selection.mode != "none"
    needed = o.batch_size_per_task + (1 if selecting else 0)
    images, data_read = {}, {}
    for t in tasks:
        unlabelled = held_out_images(
            modelpool, t, processor, o.num_unlabelled_per_task, o.seed, o.data_source, guard=guard
        )
        data_read[t] = unlabelled.source
        if len(unlabelled) < needed:
            raise ValueError(
                f"task {t!r}: {len(unlabelled)} unlabelled images, fewer than "
                f"batch_size_per_task={o.batch_size_per_task}"
                + (" plus one held out for `model_selection`" if selecting else "")
            )
        # a configured number is stacked once; the whole split (None) is streamed, never held
        images[t] = (
            StreamedImages(unlabelled)
            if o.num_unlabelled_per_task is None
            else stack_images(unlabelled)
        )
    return images, data_read


def split_for_selection(tasks, images, teacher, data_read, options):
    """``((train images, train teacher logits), held-out (images, logits) or None)``: with model
    selection, a seeded ``model_selection.fraction`` of each task's images is held out and never
    trained on. Records the counts in ``data_read``."""
    o = options
    if o.model_selection.mode == "none":
        for t in tasks:
            data_read[t]["num_training_images"] = len(images[t])
        return (images, teacher), None
    train_images, train_teacher, held_images, held_teacher = {}, {}, {}, {}
    generator = torch.Generator().manual_seed(o.seed)
    for t in tasks:
        n = len(images[t])
        n_held = min(n - o.batch_size_per_task, max(1, round(o.model_selection.fraction * n)))
        order = torch.randperm(n, generator=generator)
        held, kept = order[:n_held], order[n_held:]
        train_images[t], held_images[t] = select(images[t], kept), select(images[t], held)
        train_teacher[t] = teacher[t][kept.to(teacher[t].device)]
        held_teacher[t] = teacher[t][held.to(teacher[t].device)]
        data_read[t] |= {"num_training_images": len(kept), "num_selection_images": n_held}
    return (train_images, train_teacher), (held_images, held_teacher)
