"""On-disk cache of distilled students, keyed by what determines them.

Key = SHA-256 of a JSON payload holding the teacher's identity (its pool entry, a digest of its
weights, of its head and of its processor), the student's starting point (digest of ``_pretrained_``
and of the task's zero-shot head, its processor), the data (a digest of the training images the
steps use, in order of first use, read batch by batch without decoding; of their labels only when
labels are used) and every distillation option. Both processors are part of the key, so the images
and the processors determine the pixels each side sees.

A student lives in ``<cache_dir>/<key>/`` (``save_pretrained`` of a ``CLIPVisionModel`` plus
``manifest.json``), written in ``<cache_dir>/.tmp-<key>-<pid>/`` and moved into place with
``os.replace``; ``manifest.json`` with ``"complete": true`` is written last, so an interrupted write
is never taken for a complete student. The conventions (and the lock / manifest helpers) are the
mini benchmark builder's (:mod:`statsmerge_plugin.mini.store`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from statsmerge_plugin.mini.store import MANIFEST, file_lock, read_manifest

# bump when the meaning of the cached content changes (e.g. the training loop); 2: streamed
# training images, the data digest covers the images the steps use
CACHE_FORMAT = 2


def default_cache_dir() -> Path:
    """``$STATSMERGE_STUDENT_CACHE`` or ``<user cache dir>/statsmerge-plugin/students``."""
    if os.environ.get("STATSMERGE_STUDENT_CACHE"):
        return Path(os.environ["STATSMERGE_STUDENT_CACHE"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("statsmerge-plugin")) / "students"


def tensor_digest(*tensors: torch.Tensor) -> str:
    """SHA-256 of the tensors' dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over a ``{name: tensor}`` mapping, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(tensor_digest(state[name]).encode())
    return h.hexdigest()


def module_digest(module: nn.Module) -> str:
    """:func:`state_digest` of a module's full state dict (parameters and buffers)."""
    return state_digest(module.state_dict())


def student_cache_key(
    teacher: Mapping[str, Any], data: Mapping[str, Any], options: Mapping[str, Any]
) -> str:
    """Directory name of a student: ``<task>-<16 hex digits>``."""
    payload = {"format": CACHE_FORMAT, "teacher": teacher, "data": data, "options": options}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    task = "".join(
        c if c.isalnum() or c in "-_." else "_" for c in str(teacher.get("task", "student"))
    )
    return f"{task}-{digest[:16]}"


def cached_student(cache_dir: Path, key: str) -> Optional[Path]:
    """Path of the complete cached student ``key``, else ``None``."""
    path = Path(cache_dir) / key
    return path if read_manifest(path) is not None else None


def save_student(
    cache_dir: Path, key: str, student: nn.Module, manifest: Mapping[str, Any]
) -> Path:
    """Atomically store ``student`` (``save_pretrained``) with its manifest; returns its path."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / key
    tmp = cache_dir / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        student.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(
            json.dumps(dict(manifest, key=key, complete=True), indent=2, default=str)
        )
        if target.exists():  # an incomplete leftover (a complete one is a hit and never rewritten)
            trash = cache_dir / f".trash-{key}-{os.getpid()}"
            os.replace(target, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def student_lock(cache_dir: Path, key: str):
    """Exclusive lock for building student ``key`` (another process or rank waits, then hits)."""
    return file_lock(Path(cache_dir) / f".{key}.lock")
