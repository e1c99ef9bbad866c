"""The distillation's data path: training images streamed batch by batch, labelled only when used.

A train split can be large (SVHN: 73k images, 44 GB per view at 224 px as a float tensor), so
nothing here materialises a split:

* :class:`PairedViews` processes one image into the student's and the teacher's view (two
  FusionBench-style :class:`~statsmerge_plugin.data.UnlabelledImages`, so labels are never read);
  :class:`LabelledPairs` adds the label, for ``use_labels`` only;
* :class:`StepBatches` is the batch sampler that hands a ``DataLoader`` the planned batches of every
  step, so memory holds one batch (plus the loader's prefetch), whatever the split's size;
* :class:`TeacherMemo` keeps the teacher's logits of an image the first time it is used (without
  augmentation they never change), so only images that are actually trained on are labelled;
* :func:`images_digest` identifies the images a student is trained on, in order, for the student
  cache key: it reads the encoded image bytes of the used rows only (no decoding), batch by batch.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Dict, Iterator, List, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from statsmerge_plugin.data import UnlabelledImages, _image_of


class PairedViews(Dataset):
    """``(student pixels, teacher pixels, position)`` of ``dataset[indices[position]]``.

    Args:
        dataset: the train split (rows ``{"image": PIL, ...}`` or ``(image, label)``).
        student_processor, teacher_processor: each side's own image processor.
        indices: the rows of ``dataset`` that positions refer to.
    """

    def __init__(self, dataset, student_processor, teacher_processor, indices: Sequence[int]):
        self.student = UnlabelledImages(dataset, student_processor, indices)
        self.teacher = UnlabelledImages(dataset, teacher_processor, indices)

    def __len__(self) -> int:
        return len(self.student)

    def __getitem__(self, position: int):
        return self.student[position], self.teacher[position], position


class LabelledPairs(PairedViews):
    """:class:`PairedViews` plus the row's ground-truth label (only ever used with ``use_labels``)."""

    def __getitem__(self, position: int):
        item = self.student.dataset[self.student.indices[position]]
        label = int(item["label"] if isinstance(item, dict) else item[1])
        return (*super().__getitem__(position), label)


class StepBatches(Sampler):
    """Batch sampler yielding the positions of each planned step, in order."""

    def __init__(self, batches: Sequence[torch.Tensor]):
        self.batches = [b.tolist() for b in batches]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self.batches)


def step_loader(
    views: Dataset, batches: Sequence[torch.Tensor], num_workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """A ``DataLoader`` over ``views`` that yields exactly ``batches`` (one per optimiser step)."""
    return DataLoader(
        views,
        batch_sampler=StepBatches(batches),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


class TeacherMemo:
    """Teacher logits per position, computed the first time a position is used."""

    def __init__(self, teacher_logits: Callable[[torch.Tensor], torch.Tensor]):
        self.teacher_logits = teacher_logits
        self.rows: Dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def targets(self, positions: torch.Tensor, teacher_pixels: torch.Tensor) -> torch.Tensor:
        """Logits of ``positions``; only the positions never seen are run through the teacher."""
        keys = [int(p) for p in positions]
        first: Dict[int, int] = {}  # unseen position -> its first place in this batch
        for i, key in enumerate(keys):
            if key not in self.rows and key not in first:
                first[key] = i
        if first:
            logits = self.teacher_logits(teacher_pixels[list(first.values())])
            for key, row in zip(first, logits):
                self.rows[key] = row.detach()
        return torch.stack([self.rows[k] for k in keys])


def used_positions(batches: Sequence[torch.Tensor]) -> List[int]:
    """The distinct positions the planned batches use, in order of first use."""
    return list(dict.fromkeys(int(p) for b in batches for p in b))


def _base_rows(dataset, rows: Sequence[int]):
    """``(underlying dataset, its rows)`` through any ``torch.utils.data.Subset`` wrappers."""
    rows = list(rows)
    while isinstance(dataset, Subset):
        rows = [int(dataset.indices[r]) for r in rows]
        dataset = dataset.dataset
    return dataset, rows


def _encoded_image_column(dataset):
    """The dataset with its image column not decoded, or ``None`` if it has no such column."""
    features = getattr(dataset, "features", None)
    if features is None or not hasattr(dataset, "cast_column"):
        return None
    from datasets import Image

    for column in ("image", "img"):
        if isinstance(features.get(column), Image):
            return dataset.cast_column(column, Image(decode=False)), column
    return None


def _image_bytes(value) -> bytes:
    if isinstance(value, dict):  # an encoded HF image: its bytes, else the file it points to
        if value.get("bytes") is not None:
            return value["bytes"]
        with open(value["path"], "rb") as f:
            return f.read()
    image = value.convert("RGB") if hasattr(value, "convert") else value
    if hasattr(image, "tobytes"):
        return f"{getattr(image, 'size', '')}".encode() + image.tobytes()
    return torch.as_tensor(image).contiguous().numpy().tobytes()


def images_digest(dataset, rows: Sequence[int], batch_size: int = 256) -> str:
    """SHA-256 of the images of ``dataset[rows]`` in this order (labels are never read).

    Hugging Face datasets with an ``Image`` column are read without decoding (their encoded bytes);
    other datasets are hashed from their decoded RGB pixels. Memory: one batch of rows.
    """
    base, base_rows = _base_rows(dataset, rows)
    h = hashlib.sha256()
    encoded = _encoded_image_column(base)
    for start in range(0, len(base_rows), batch_size):
        chunk = base_rows[start : start + batch_size]
        if encoded is not None:
            table, column = encoded
            values = table[chunk][column]
        else:
            values = [_image_of(base[r]) for r in chunk]
        for value in values:
            data = _image_bytes(value)
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def read_labels(dataset, indices: List[int]) -> torch.Tensor:
    """Ground-truth labels of ``dataset[indices]`` (only ever called with ``use_labels``); a Hugging
    Face dataset's label column is read without decoding its images."""
    if hasattr(dataset, "select_columns") and "label" in getattr(dataset, "column_names", ()):
        return torch.tensor(dataset.select_columns(["label"])[list(indices)]["label"])
    labels = []
    for i in indices:
        item = dataset[i]
        labels.append(int(item["label"] if isinstance(item, dict) else item[1]))
    return torch.tensor(labels, dtype=torch.long)
