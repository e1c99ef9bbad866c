"""Unlabelled, held-out image data for label-free merging (StatsMerging §3.3, ProDistill §1.1).

Every training or selection signal in this package comes from images of a split *held out of training
data*: the pool's ``val`` split when it has one, else a seeded slice of its ``train`` split. The ``test``
split is never read here, whatever a config says:

* :func:`held_out_images` refuses ``source="test"``;
* :class:`TestSplitGuard` refuses a val/train dataset that *is* a test set: of any task, of the model
  pool or of the task pool (FusionBench pools often keep the test sets only in the task pool). It
  compares what the configs read (resolved real paths of saved datasets and local files, hub ids with
  their split names, slices such as ``test[:50%]`` counting as ``test``) and then the loaded dataset
  (Hugging Face fingerprints, including the one saved with a dataset, and the real paths of its
  files) against the test sets'. Only metadata of a test set is opened (``state.json``, the memory
  map of a saved dataset); no test row is read;
* :class:`UnlabelledImages` drops labels at the source: it yields pixel tensors only, so no caller can
  train on ground truth by accident, and records what was read (``source``: split, paths,
  fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, FrozenSet, Literal, Mapping, Optional, Sequence, Set, Tuple

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

    Labels are never returned. ``source`` records what was read (split, paths, fingerprint).
    """

    def __init__(
        self,
        dataset,
        processor,
        indices: Optional[Sequence[int]] = None,
        source: Optional[dict] = None,
    ):
        self.dataset = dataset
        self.processor = processor
        self.indices = list(range(len(dataset))) if indices is None else list(indices)
        self.source = dict(source or {})

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = _image_of(self.dataset[self.indices[i]])
        if hasattr(image, "convert"):
            image = image.convert("RGB")
        return self.processor(images=[image], return_tensors="pt")["pixel_values"][0]


def plain_config(cfg):
    """A resolved, plain-Python copy of a config value (DictConfig / ListConfig); else unchanged."""
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


def _config_of(modelpool, split: str, task: str):
    configs = getattr(modelpool, f"_{split}_datasets", None)
    if configs is None or task not in configs:
        return None
    return plain_config(configs[task])


# --- what a dataset (config) reads -----------------------------------------------------------------

_SLICE = re.compile(r"\[[^\]]*\]")


def split_names(split) -> Tuple[str, ...]:
    """Base split names of a Hugging Face split expression: ``"test[:50%]+train"`` -> ``("test",
    "train")``; ``None`` -> ``(None,)`` (every split)."""
    if split is None:
        return (None,)
    return tuple(sorted({_SLICE.sub("", part).strip() for part in str(split).split("+")}))


def _real(path) -> str:
    return os.path.realpath(os.path.expanduser(str(path)))


def _is_local(path) -> bool:
    return os.path.exists(os.path.expanduser(str(path)))


def _cache_dirs(dataset) -> Set[str]:
    files = getattr(dataset, "cache_files", None) or []
    return {_real(os.path.dirname(f["filename"])) for f in files if f.get("filename")}


def dataset_sources(cfg) -> FrozenSet[tuple]:
    """What a dataset config (or a dataset object) reads, as comparable "sources":

    * ``("path", real path)`` for ``dataset_path`` (``datasets.load_from_disk``), a local ``path`` or
      ``data_dir`` of ``datasets.load_dataset``, local ``data_files``, and the files of a loaded dataset;
    * ``("hub", id, config name, split)`` for every base split of a hub dataset (``path`` not local);
    * ``("config", canonical JSON)`` when nothing else is recognised, so identical configs still match.

    Nested configs (e.g. FusionBench's ``train_validation_split(dataset=...)``) are searched too.
    """
    found: Set[tuple] = set()

    def walk(node):
        if isinstance(node, Mapping):
            if node.get("dataset_path") is not None:
                found.add(("path", _real(node["dataset_path"])))
            path = node.get("path")
            if isinstance(path, (str, os.PathLike)):
                if _is_local(path):
                    found.add(("path", _real(path)))
                else:
                    for split in split_names(node.get("split")):
                        found.add(("hub", str(path), node.get("name"), split))
            if node.get("data_dir") is not None and _is_local(node["data_dir"]):
                found.add(("path", _real(node["data_dir"])))
            files = node.get("data_files")
            for f in files if isinstance(files, (list, tuple)) else [files] if files else []:
                if isinstance(f, (str, os.PathLike)) and _is_local(f):
                    found.add(("path", _real(f)))
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)
        elif hasattr(node, "cache_files"):  # a loaded Hugging Face dataset
            found.update(("path", d) for d in _cache_dirs(node))
        elif hasattr(node, "dataset") and hasattr(node, "indices"):  # torch Subset
            walk(node.dataset)

    cfg = plain_config(cfg)
    walk(cfg)
    if not found and isinstance(cfg, (Mapping, list, tuple, str)):
        found.add(("config", json.dumps(cfg, sort_keys=True, default=str)))
    return frozenset(found)


def describe_source(source: tuple) -> str:
    if source[0] == "path":
        return f"{source[1]!r}"
    if source[0] == "hub":
        name = f" (config {source[2]!r})" if source[2] is not None else ""
        split = "every split" if source[3] is None else f"split {source[3]!r}"
        return f"hub dataset {source[1]!r}{name}, {split}"
    return "the same dataset config"


def _base_dataset(dataset):
    while hasattr(dataset, "dataset") and hasattr(dataset, "indices"):  # torch Subset
        dataset = dataset.dataset
    return dataset


def _saved_fingerprint(directory: str) -> Optional[str]:
    state = Path(directory) / "state.json"
    try:
        return json.loads(state.read_text()).get("_fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def dataset_fingerprints(dataset) -> Set[str]:
    """Hugging Face fingerprints of a loaded dataset (of the dataset under a ``Subset``): its own and
    the ones saved with the files it reads (``state.json``)."""
    base = _base_dataset(dataset)
    found = {base._fingerprint} if getattr(base, "_fingerprint", None) else set()
    found.update(fp for d in _cache_dirs(base) if (fp := _saved_fingerprint(d)))
    return found


def dataset_record(dataset, split: str) -> dict:
    """What was actually read, for run summaries: split, real paths, fingerprint, size."""
    base = _base_dataset(dataset)
    fingerprint = getattr(base, "_fingerprint", None)
    if fingerprint is not None and base is not dataset:  # a Subset: the base, plus which rows
        rows = hashlib.sha256(json.dumps(list(map(int, dataset.indices))).encode()).hexdigest()
        fingerprint = f"{fingerprint}[rows {rows[:16]}]"
    return {
        "split": split,
        "paths": sorted(_cache_dirs(base)),
        "fingerprint": fingerprint,
        "num_rows": len(dataset),
    }


class TestSplitGuard:
    """The test sets of a model pool and of a task pool, to refuse any of them as training data.

    Args:
        modelpool: a FusionBench model pool (its ``test_datasets``), or ``None``.
        taskpool: a FusionBench task pool object or its config (its ``test_datasets``), or ``None``.
    """

    def __init__(self, modelpool=None, taskpool=None):
        self.test_sets: Dict[str, Any] = {}
        for owner, pool in (("model pool", modelpool), ("task pool", taskpool)):
            for task, cfg in self._test_configs(pool).items():
                self.test_sets[f"the test set of task {task!r} in the {owner}"] = cfg
        self._sources = {label: dataset_sources(cfg) for label, cfg in self.test_sets.items()}
        self._fingerprints: Optional[Dict[str, Set[str]]] = None

    @staticmethod
    def _test_configs(pool) -> Mapping:
        if pool is None:
            return {}
        if isinstance(pool, Mapping) or OmegaConf.is_config(pool):  # a task pool config
            return pool.get("test_datasets") or {}
        return getattr(pool, "_test_datasets", None) or {}

    def _refuse(self, task: str, split: str, what: str, label: str) -> ValueError:
        return ValueError(
            f"task {task!r}: its {split!r} dataset {what}, which is {label}; refusing to train on "
            f"test data. Point `{self._key(task, split)}` at a held-out split."
        )

    @staticmethod
    def _key(task: str, split: str) -> str:
        """The option a user edits: a few-shot spec (language models) or a pool's datasets."""
        return f"method.few_shot.{task}" if split == "few_shot" else f"{split}_datasets.{task}"

    def check_config(self, task: str, split: str, cfg) -> None:
        """Refuse a held-out dataset config that reads any test set (paths, hub ids and splits)."""
        held = dataset_sources(cfg)
        for label, sources in self._sources.items():
            common = sorted(held & sources)
            if common:
                raise self._refuse(task, split, f"reads {describe_source(common[0])}", label)

    def test_fingerprints(self) -> Dict[str, Set[str]]:
        """Fingerprints of the test sets saved on disk (their metadata only; computed once)."""
        if self._fingerprints is None:
            self._fingerprints = {}
            for label, sources in self._sources.items():
                found: Set[str] = set()
                for source in sources:
                    if source[0] == "path" and (Path(source[1]) / "state.json").is_file():
                        found |= {fp for fp in [_saved_fingerprint(source[1])] if fp}
                        found |= _loaded_fingerprint(source[1])
                self._fingerprints[label] = found
        return self._fingerprints

    def check_dataset(self, task: str, split: str, dataset) -> None:
        """Refuse a loaded held-out dataset whose files or fingerprint are those of a test set."""
        held = dataset_sources(dataset)
        for label, sources in self._sources.items():
            common = sorted(held & sources)
            if common:
                raise self._refuse(
                    task, split, f"reads files in {describe_source(common[0])}", label
                )
        prints = dataset_fingerprints(dataset)
        for label, test_prints in self.test_fingerprints().items():
            common = sorted(prints & test_prints)
            if common:
                raise self._refuse(
                    task, split, f"has the Hugging Face fingerprint {common[0]!r}", label
                )


def _loaded_fingerprint(directory: str) -> Set[str]:
    """The fingerprint ``datasets.load_from_disk`` gives a saved dataset (memory-maps, reads no row)."""
    try:
        from datasets import Dataset as HFDataset
        from datasets import load_from_disk

        loaded = load_from_disk(directory)
    except Exception:  # noqa: BLE001 - not a loadable saved Dataset: nothing to compare
        return set()
    return {loaded._fingerprint} if isinstance(loaded, HFDataset) else set()


def resolve_held_out_source(
    modelpool, task: str, source: HeldOutSource = "auto", guard: Optional[TestSplitGuard] = None
) -> str:
    """Which split supplies task ``task``'s unlabelled images: ``"val"`` or ``"train"``.

    Args:
        guard: the test sets to refuse; by default the model pool's.

    Raises:
        ValueError: for ``source="test"`` or an unknown source, when the task has no usable split, or when
            the chosen split's dataset config reads a test set (see :class:`TestSplitGuard`).
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
    guard = guard if guard is not None else TestSplitGuard(modelpool)
    guard.check_config(task, split, _config_of(modelpool, split, task))
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
    guard: Optional[TestSplitGuard] = None,
) -> UnlabelledImages:
    """Unlabelled images of ``task`` from a split held out of training data (never a test set).

    Args:
        guard: the test sets to refuse (see :class:`TestSplitGuard`); by default the model pool's.
    """
    guard = guard if guard is not None else TestSplitGuard(modelpool)
    split = resolve_held_out_source(modelpool, task, source, guard)
    dataset = getattr(modelpool, f"load_{split}_dataset")(task)
    guard.check_dataset(task, split, dataset)
    indices = held_out_indices(len(dataset), num_samples, seed, task, split)
    record = dataset_record(dataset, split) | {"num_images": len(indices)}
    log.info(
        f"task {task}: {len(indices)} unlabelled images from the {split!r} split "
        f"(fingerprint {record['fingerprint']}, {record['paths']})"
    )
    return UnlabelledImages(dataset, processor, indices, source=record)


def stack_images(images: UnlabelledImages, batch_size: int = 256) -> torch.Tensor:
    """Process all images once into one ``[N, C, H, W]`` tensor (small few-shot sets only)."""
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False)
    return torch.cat(list(loader), dim=0)
