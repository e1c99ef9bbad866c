"""A real-scale build as FusionBench's own ``CLIPVisionModelPool`` and ``CLIPVisionModelTaskPool``.

A build has the mini benchmark's layout, so its dataset entries are the mini benchmark's
(:func:`statsmerge_plugin.mini.evaluate.dataset_config`). The heterogeneous pool replaces the
teacher task's model by the ResNet teacher (a
``transformers.AutoModelForImageClassification.from_pretrained`` entry, as a user's pool declares
one) and may train it on another train split. The same configs are written as YAML for
``fusion_bench --config-dir <dir> modelpool=realscale taskpool=realscale method=...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import yaml

from statsmerge_plugin.mini.evaluate import dataset_config

from .build import load_manifest

SPLITS = ("train", "val", "test")


def tasks_of(build: Path) -> list:
    return list(load_manifest(build)["recipe"]["tasks"])


def pool_config(
    build: Path,
    tasks: Optional[Sequence[str]] = None,
    hetero: bool = False,
    train_split: str = "train",
) -> Dict:
    """A ``CLIPVisionModelPool`` config: ``_pretrained_``, every task model, train/val/test sets.

    Args:
        hetero: replace the teacher task's model by the build's ResNet teacher.
        train_split: the teacher task's train split (e.g. ``train_4096``); only with ``hetero``.
    """
    build = Path(build)
    manifest = load_manifest(build)
    tasks = list(tasks or manifest["recipe"]["tasks"])
    models = {"_pretrained_": str(build / "pretrained")}
    models.update({t: str(build / "models" / t) for t in tasks})
    datasets = {s: {t: dataset_config(build, t, s) for t in tasks} for s in SPLITS}
    if hetero:
        teacher = manifest["recipe"]["teacher_task"]
        if teacher is None or teacher not in tasks:
            raise ValueError(f"build {str(build)!r} has no teacher among the tasks {tasks}")
        if not (build / "data" / teacher / train_split).is_dir():
            raise ValueError(f"build {str(build)!r} has no split {train_split!r} of {teacher!r}")
        models[teacher] = {
            "_target_": "transformers.AutoModelForImageClassification.from_pretrained",
            "pretrained_model_name_or_path": str(build / "teachers" / teacher),
        }
        datasets["train"][teacher] = dataset_config(build, teacher, train_split)
    return {
        "_target_": "fusion_bench.modelpool.CLIPVisionModelPool",
        "_recursive_": False,
        "processor": str(build / "pretrained"),
        "models": models,
        **{f"{s}_datasets": datasets[s] for s in SPLITS},
    }


def modelpool(build: Path, tasks: Optional[Sequence[str]] = None, **kwargs):
    """FusionBench's ``CLIPVisionModelPool`` of :func:`pool_config`."""
    from fusion_bench.utils import instantiate
    from omegaconf import DictConfig

    return instantiate(DictConfig(pool_config(build, tasks, **kwargs)))


def taskpool_config(build: Path, tasks: Optional[Sequence[str]] = None, batch_size: int = 64):
    """A ``CLIPVisionModelTaskPool`` config evaluating the test splits."""
    build = Path(build)
    pretrained = str(build / "pretrained")
    return {
        "_target_": "fusion_bench.taskpool.CLIPVisionModelTaskPool",
        "_recursive_": False,
        "base_model": pretrained,
        "clip_model": {
            "_target_": "transformers.CLIPModel.from_pretrained",
            "pretrained_model_name_or_path": pretrained,
        },
        "processor": {
            "_target_": "transformers.CLIPProcessor.from_pretrained",
            "pretrained_model_name_or_path": pretrained,
        },
        "dataloader_kwargs": {"batch_size": batch_size, "num_workers": 0, "shuffle": False},
        "test_datasets": {t: dataset_config(build, t, "test") for t in tasks or tasks_of(build)},
    }


def taskpool(build: Path, tasks: Optional[Sequence[str]] = None, batch_size: int = 64):
    from fusion_bench.utils import instantiate
    from omegaconf import DictConfig

    return instantiate(DictConfig(taskpool_config(build, tasks, batch_size)))


def write_configs(build: Path, config_dir: Path, name: str = "realscale") -> Path:
    """``modelpool/<name>.yaml``, ``modelpool/<name>_hetero.yaml`` (if the build has a teacher)
    and ``taskpool/<name>.yaml`` for ``fusion_bench --config-dir <config_dir>``."""
    build, config_dir = Path(build), Path(config_dir)
    files = {("modelpool", name): pool_config(build), ("taskpool", name): taskpool_config(build)}
    if load_manifest(build)["recipe"]["teacher_task"] is not None:
        files[("modelpool", f"{name}_hetero")] = pool_config(build, hetero=True)
    for (group, stem), cfg in files.items():
        (config_dir / group).mkdir(parents=True, exist_ok=True)
        (config_dir / group / f"{stem}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return config_dir
