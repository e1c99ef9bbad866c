"""Unlabelled, held-out image data for label-free merging (StatsMerging §3.3, ProDistill §1.1).

Every training or selection signal in this package comes from images of a split *held out of training
data*: the pool's ``val`` split when it has one, else a seeded slice of its ``train`` split. The ``test``
split is never read here, whatever a config says:

* :func:`held_out_images` refuses ``source="test"`` and refuses a val/train dataset whose config is
  identical to the task's test-dataset config (a copy-paste mistake that would leak test data);
* :class:`UnlabelledImages` drops labels at the source: it yields pixel tensors only, so no caller can
  train on ground truth by accident.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Optional, Sequence

import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

HeldOutSource = Literal["auto", "val", "train"]
HELD_OUT_SOURCES = ("auto", "val", "train")


def _image_of(item: Any):
    if isinstance(item, dict):
        return item["image"] if "image" in item else item["img"]
    return item[0]


class UnlabelledImages(Dataset):
    """Pixel values of ``dataset[indices]``, processed exactly as FusionBench's ``CLIPDataset`` does.

    Labels are never returned.
    """

    def __init__(self, dataset, processor, indices: Optional[Sequence[int]] = None):
        self.dataset = dataset
        self.processor = processor
        self.indices = list(range(len(dataset))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = _image_of(self.dataset[self.indices[i]])
        if hasattr(image, "convert"):
            image = image.convert("RGB")
        return self.processor(images=[image], return_tensors="pt")["pixel_values"][0]


def _config_of(modelpool, split: str, task: str):
    configs = getattr(modelpool, f"_{split}_datasets", None)
    if configs is None or task not in configs:
        return None
    cfg = configs[task]
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


def resolve_held_out_source(modelpool, task: str, source: HeldOutSource = "auto") -> str:
    """Which split supplies task ``task``'s unlabelled images: ``"val"`` or ``"train"``.

    Raises:
        ValueError: for ``source="test"`` or an unknown source, when the task has no usable split, or when
            the chosen split's dataset config is identical to the task's test-dataset config.
    """
    if source not in HELD_OUT_SOURCES:
        raise ValueError(
            f"unlabelled data source {source!r} is not allowed for task {task!r}: choose one of "
            f"{HELD_OUT_SOURCES}. The test split is never used for training or model selection."
        )
    if source == "auto":
        split = "val" if task in modelpool.val_dataset_names else "train"
    else:
        split = source
    names = getattr(modelpool, f"{split}_dataset_names")
    if task not in names:
        raise ValueError(
            f"task {task!r} has no unlabelled data: the model pool has no {split!r} dataset for it "
            f"(val datasets: {modelpool.val_dataset_names}, train datasets: "
            f"{modelpool.train_dataset_names}). Add `{split}_datasets.{task}` to the pool config."
        )
    test_cfg = _config_of(modelpool, "test", task)
    if test_cfg is not None and _config_of(modelpool, split, task) == test_cfg:
        raise ValueError(
            f"the {split!r} dataset of task {task!r} is configured exactly like its test dataset; "
            f"refusing to train on test data. Point `{split}_datasets.{task}` at a held-out split."
        )
    return split


def held_out_indices(
    n_available: int, num_samples: Optional[int], seed: int, task: str, split: str
):
    """A seeded subset of ``range(n_available)`` of size ``num_samples`` (all when ``None``)."""
    if n_available == 0:
        raise ValueError(f"task {task!r}: the {split!r} split is empty, no unlabelled data to use")
    if num_samples is None:
        return list(range(n_available))
    if num_samples <= 0:
        raise ValueError(
            f"task {task!r}: the number of unlabelled samples must be > 0, got {num_samples}"
        )
    if num_samples > n_available:
        raise ValueError(
            f"task {task!r}: asked for {num_samples} unlabelled images but its {split!r} split has only "
            f"{n_available}; lower the per-task sample count or add data"
        )
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_available, generator=g)[:num_samples].tolist()


def held_out_images(
    modelpool,
    task: str,
    processor,
    num_samples: Optional[int],
    seed: int = 0,
    source: HeldOutSource = "auto",
) -> UnlabelledImages:
    """Unlabelled images of ``task`` from a split held out of training data (never the test split)."""
    split = resolve_held_out_source(modelpool, task, source)
    dataset = getattr(modelpool, f"load_{split}_dataset")(task)
    indices = held_out_indices(len(dataset), num_samples, seed, task, split)
    log.info(f"task {task}: {len(indices)} unlabelled images from the {split!r} split")
    return UnlabelledImages(dataset, processor, indices)


def stack_images(images: UnlabelledImages, batch_size: int = 256) -> torch.Tensor:
    """Process all images once into one ``[N, C, H, W]`` tensor (small few-shot sets only)."""
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False)
    return torch.cat(list(loader), dim=0)
