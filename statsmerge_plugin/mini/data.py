"""Deterministic generation of the mini tasks' image splits, and saving them as HF datasets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import numpy as np

from .tasks import TASK_NAMES, draw, get_task

SPLITS = ("train", "val", "test")
PARTS = ("pretrain",) + SPLITS  # "pretrain" is the separate pool the CLIP is pretrained on


@dataclass
class Split:
    """Images as a uint8 array ``(N, 32, 32, 3)`` and integer labels ``(N,)``."""

    images: np.ndarray
    labels: np.ndarray


def image_rng(seed: int, task: str, part: str, index: int) -> np.random.Generator:
    """One independent random stream per image, so any subset regenerates identically."""
    return np.random.default_rng([seed, TASK_NAMES.index(task), PARTS.index(part), index])


def generate_split(task: str, part: str, per_class: int, seed: int) -> Split:
    """``per_class`` images of each class of ``task``, class-interleaved."""
    num_classes = len(get_task(task).classnames)
    labels = np.tile(np.arange(num_classes), per_class)
    images = np.stack(
        [
            np.asarray(draw(task, image_rng(seed, task, part, i), int(y), part))
            for i, y in enumerate(labels)
        ]
    )
    return Split(images=images, labels=labels.astype(np.int64))


def save_split(split: Split, task: str, path: Path) -> None:
    """Save with ``datasets.save_to_disk``: features ``image`` (PIL) and ``label`` (ClassLabel)."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature
    from PIL import Image

    features = Features(
        {"image": ImageFeature(), "label": ClassLabel(names=list(get_task(task).classnames))}
    )
    ds = Dataset.from_dict(
        {"image": [Image.fromarray(a) for a in split.images], "label": split.labels.tolist()},
        features=features,
    )
    ds.save_to_disk(str(path))


def load_split(path: Path) -> Split:
    """Read a saved split back into arrays (for tests and tools)."""
    from datasets import load_from_disk

    ds = load_from_disk(str(path))
    images = np.stack([np.asarray(im.convert("RGB")) for im in ds["image"]])
    return Split(images=images, labels=np.asarray(ds["label"], dtype=np.int64))


def sizes(recipe) -> Dict[str, int]:
    return {
        "pretrain": recipe.n_pretrain,
        "train": recipe.n_train,
        "val": recipe.n_val,
        "test": recipe.n_test,
    }
