"""Corrupted test splits of a mini build: derived artifacts of the finished build, written on first
use (atomically, under a lock, like the build itself) and never part of the build key."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..store import file_lock, read_manifest
from .table import (
    CORRUPTED_VERSION,
    CORRUPTIONS,
    DEFAULT_SEVERITY,
    SEPARATOR,
    check_corruption,
    check_severity,
    corrupt,
)

SPLITS = ("train", "val", "test")
MANIFEST = "corruption.json"


def image_seed(build_seed: int, corruption: str, severity: int, task: str, split: str, index: int):
    """The random stream of one corrupted image: independent of every other image, so a split (or
    any subset of it) regenerates identically."""
    from ..tasks import TASK_NAMES

    return [
        int(build_seed),
        CORRUPTED_VERSION,
        CORRUPTIONS.index(corruption),
        int(severity),
        TASK_NAMES.index(task),
        SPLITS.index(split),
        int(index),
    ]


def corrupted_dir(
    build: Union[str, Path], task: str, corruption: str, severity: int, split: str = "test"
) -> Path:
    """Where the corrupted ``split`` of ``task`` lives inside ``build``."""
    return (
        Path(build)
        / "corrupted"
        / f"v{CORRUPTED_VERSION}"
        / f"s{check_severity(severity)}"
        / check_corruption(corruption)
        / task
        / split
    )


def _complete(path: Path) -> Optional[dict]:
    try:
        record = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("complete") else None


def ensure_corrupted(
    build: Union[str, Path],
    task: str,
    corruption: str,
    severity: int = DEFAULT_SEVERITY,
    split: str = "test",
) -> Path:
    """Path of the corrupted ``split`` of ``task`` in the finished mini ``build``, generated first
    if needed (cheap when it exists).

    Raises:
        ValueError: unknown corruption / severity / split / task, or ``build`` is not a complete
            mini build (no ``manifest.json``) or does not contain ``task``.
        PermissionError: the build directory cannot be written.
    """
    check_corruption(corruption)
    severity = check_severity(severity)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    build = Path(build)
    manifest = read_manifest(build)
    if manifest is None:
        raise ValueError(f"{str(build)!r} is not a complete mini benchmark build (no manifest)")
    if task not in manifest["tasks"]:
        raise ValueError(
            f"task {task!r} is not in the mini build {str(build)!r}; it has {manifest['tasks']}"
        )
    target = corrupted_dir(build, task, corruption, severity, split)
    if _complete(target):
        return target
    lock_dir = build / "corrupted"
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(
            f"cannot write the corrupted splits of the mini build into {str(lock_dir)!r}: {err}"
        ) from err
    if not os.access(lock_dir, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write the corrupted splits into {str(lock_dir)!r}")
    with file_lock(lock_dir / ".lock"):
        if _complete(target):  # another process generated it while we waited
            return target
        for stale in target.parent.glob(f".tmp-{target.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
        try:
            record = _generate(build, manifest, task, corruption, severity, split, tmp)
            (tmp / MANIFEST).write_text(json.dumps(record, indent=2))  # written last
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _generate(build: Path, manifest: dict, task, corruption, severity, split, out: Path) -> dict:
    from ..data import Split, load_split, save_split

    clean = load_split(build / "data" / task / split)
    images = np.stack(
        [
            corrupt(
                image,
                corruption,
                severity,
                np.random.default_rng(
                    image_seed(manifest["seed"], corruption, severity, task, split, i)
                ),
            )
            for i, image in enumerate(clean.images)
        ]
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    save_split(Split(images=images, labels=clean.labels), task, out)
    return {
        "complete": True,
        "corrupted_version": CORRUPTED_VERSION,
        "corruption": corruption,
        "severity": severity,
        "task": task,
        "split": split,
        "clean_split": str(build / "data" / task / split),
        "build_key": manifest.get("key"),
        "build_seed": manifest["seed"],
        "num_images": int(len(images)),
        "seed_of_image_i": image_seed(manifest["seed"], corruption, severity, task, split, 0)[:-1]
        + ["i"],
    }


def load_corrupted_split(
    root: Union[str, Path],
    task: str,
    corruption: str,
    severity: int = DEFAULT_SEVERITY,
    split: str = "test",
):
    """The corrupted ``split`` of ``task`` as a ``datasets.Dataset`` (generated on first use).

    The ``_target_`` of the robustness YAMLs (``root: ${mini_clip:}``); features ``image`` (PIL) and
    ``label``, rows in the clean split's order.
    """
    from datasets import load_from_disk

    return load_from_disk(str(ensure_corrupted(root, task, corruption, severity, split)))


def corrupted_key(task: str, corruption: str) -> str:
    """Task pool key of a corrupted split evaluated next to the clean one: ``<task>__<corruption>``."""
    return f"{task}{SEPARATOR}{check_corruption(corruption)}"


def split_key(key: str):
    """``(task, corruption)`` of a task pool key; ``corruption`` is ``None`` for a clean key."""
    task, sep, suffix = key.rpartition(SEPARATOR)
    if sep and suffix in CORRUPTIONS:
        return task, suffix
    return key, None
