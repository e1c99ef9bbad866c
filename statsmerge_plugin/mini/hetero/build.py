"""The cached, atomic build of the mixed mini benchmark's teachers (``mini-clip_TA8_hetero``).

Two of the eight tasks get a model of another architecture (:data:`.recipe.TEACHERS`, trained by
:mod:`.train`); the other six keep the base build's fine-tuned CLIP models. The teachers of base
build ``<root>/<base key>/`` (:func:`statsmerge_plugin.mini.build.ensure_built`) live in the sibling
directory ``<root>/<hetero key>/teachers/<task>/`` (:func:`.recipe.hetero_key`), built with the base
builder's conventions: in a ``.tmp-*`` directory moved into place with ``os.replace``,
``manifest.json`` written last, under an ``fcntl`` lock.

The pool config loads teachers with ``_target_: statsmerge_plugin.mini.hetero.build.load_teacher``
(which builds on first use, like ``${mini_clip:}``)::

    python -m statsmerge_plugin.mini.hetero.build [MINI_BUILD]
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Union

from ..recipe import Recipe, library_versions
from ..store import cached_build, read_manifest, torch_threads
from .recipe import HETERO_PRESETS, HETERO_VERSION, TEACHERS, HeteroRecipe, hetero_key


def base_manifest(mini_root: Path) -> dict:
    """The manifest of the complete base build ``mini_root`` (``FileNotFoundError`` otherwise)."""
    manifest = read_manifest(Path(mini_root))
    if manifest is None:
        raise FileNotFoundError(f"{mini_root} is not a complete mini benchmark build")
    return manifest


def hetero_dir(mini_root: Path, preset: str) -> Path:
    """Where the teachers of base build ``mini_root`` live (a sibling directory)."""
    mini_root = Path(mini_root)
    return mini_root.parent / hetero_key(mini_root.name, HETERO_PRESETS[preset], preset)


def build_teachers(out: Path, mini_root: Path, recipe: HeteroRecipe, progress: bool = True) -> dict:
    """Train every teacher into ``out/teachers/<task>``; return the manifest content."""
    from .. import data as mini_data
    from .train import train_resnet, train_wide_clip

    manifest = base_manifest(mini_root)
    base_recipe = Recipe(**manifest["recipe"])
    seed = int(manifest["seed"])
    start = time.perf_counter()
    teachers, timings = {}, {}
    with torch_threads(base_recipe.num_threads):
        for i, (task, kind) in enumerate(TEACHERS.items()):
            t = time.perf_counter()
            splits = {
                s: mini_data.load_split(mini_root / "data" / task / s) for s in ("train", "val")
            }
            path = out / "teachers" / task
            path.mkdir(parents=True, exist_ok=True)
            task_seed = seed * 1000 + 500 + i
            if kind == "resnet":
                teachers[task] = train_resnet(path, task, splits, recipe, task_seed, progress)
            else:
                teachers[task] = train_wide_clip(
                    path, task, splits, base_recipe, recipe, task_seed, progress
                )
            timings[task] = round(time.perf_counter() - t, 2)
    timings["total"] = round(time.perf_counter() - start, 2)
    return {
        "hetero_version": HETERO_VERSION,
        "recipe": recipe.to_dict(),
        "teachers": teachers,
        "libraries": library_versions(),
        "timings_seconds": timings,
    }


def ensure_hetero_built(
    mini_root: Union[None, str, Path] = None, preset: Optional[str] = None, progress: bool = True
) -> Path:
    """Path of the teachers' build for base build ``mini_root`` (default: ``${mini_clip:}``'s).

    ``preset`` defaults to the base build's preset (``default`` or ``smoke``).
    """
    if mini_root is None:
        from ..resolver import mini_clip_root

        mini_root = mini_clip_root()
    mini_root = Path(mini_root)
    preset = preset or base_manifest(mini_root).get("preset", "default")
    target = hetero_dir(mini_root, preset)
    if read_manifest(target) is not None:
        return target
    cached_build(
        target.parent,
        target.name,
        lambda tmp: build_teachers(tmp, mini_root, HETERO_PRESETS[preset], progress),
        extra={"preset": preset, "base": str(mini_root), "key": target.name},
    )
    return target


def load_teacher(task: str, mini_root: Union[None, str, Path] = None, preset: Optional[str] = None):
    """Model-pool loader (``_target_``) of the teacher of ``task``, building the teachers if needed.

    Returns a ``ResNetForImageClassification`` or a ``CLIPVisionModel`` loaded with
    ``from_pretrained`` from ``<hetero build>/teachers/<task>``, which also holds its processor
    (and, for the CLIP teacher, the full ``CLIPModel`` with its text tower).
    """
    if task not in TEACHERS:
        raise KeyError(
            f"the mini hetero benchmark has no teacher for {task!r}; teachers: {sorted(TEACHERS)}"
        )
    path = ensure_hetero_built(mini_root, preset) / "teachers" / task
    if TEACHERS[task] == "resnet":
        from transformers import AutoModelForImageClassification

        return AutoModelForImageClassification.from_pretrained(str(path))
    from transformers import CLIPVisionModel

    return CLIPVisionModel.from_pretrained(str(path))


if __name__ == "__main__":
    import sys

    print(ensure_hetero_built(sys.argv[1] if len(sys.argv) > 1 else None))
