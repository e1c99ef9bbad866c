"""The deterministic, cached, atomic builder of the mini benchmark.

A build lives in ``<root>/<key>/`` where ``key`` (see ``recipe.build_key``) changes with the recipe
(its knobs and ``RECIPE_VERSION``), preset, seed, task subset and the library versions, so that stale
weights (and FusionBench's zero-shot-head cache keyed on the model path) are never reused, while a
refactor of the code keeps every build::

    <key>/data/<task>/{train,val,test}   datasets.save_to_disk, features image + label
    <key>/pretrained/                    CLIPModel + CLIPProcessor
    <key>/models/<task>/                 fine-tuned CLIPVisionModel
    <key>/manifest.json                  written last: a build without it is not complete

The build happens in ``<root>/.tmp-<key>-<pid>`` and is moved into place with ``os.replace``;
an ``fcntl`` lock on ``<root>/.<key>.lock`` keeps concurrent processes from building the same key.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

from .domain import pretrain_pool
from .recipe import RECIPE_VERSION, Recipe, build_key, get_recipe, library_versions, pretrain_key
from .store import read_manifest  # noqa: F401 (part of this module's API: tests, callers)
from .store import build_digests, cached_build, check_root, default_root, file_lock, torch_threads
from .tasks import TASK_NAMES


def normalize_tasks(tasks: Union[None, str, Sequence[str]]) -> tuple:
    """Task subset in TA8 order; accepts ``"a,b"`` strings and short names (``mnist``)."""
    if tasks is None:
        return TASK_NAMES
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    names = {t if t.startswith("mini_") else f"mini_{t}" for t in tasks}
    unknown = names - set(TASK_NAMES)
    if unknown:
        raise ValueError(f"unknown mini tasks {sorted(unknown)}; known: {', '.join(TASK_NAMES)}")
    if not names:
        raise ValueError(f"the task subset {tasks!r} names no task; known: {', '.join(TASK_NAMES)}")
    return tuple(t for t in TASK_NAMES if t in names)


def _stage(timings: Dict[str, float], name: str, start: float) -> float:
    now = time.perf_counter()
    timings[name] = round(now - start, 2)
    return now


def pretrained_clip(stage_dir: Optional[Path], recipe: Recipe, seed: int, processor, pools, pbar):
    """The contrastively pretrained CLIP and its loss curve, from ``stage_dir`` if it holds one.

    ``stage_dir`` (``<root>/.stages/<pretrain_key>``) lets builds that differ only in their
    fine-tuning knobs share one pretraining (what a recipe search varies most).
    """
    from transformers import CLIPModel

    from . import train

    if stage_dir is None:
        clip = train.make_clip(recipe, processor.tokenizer)
        return clip, train.pretrain(clip, processor.tokenizer, pools, recipe, seed, pbar)
    with file_lock(stage_dir.with_name(f".{stage_dir.name}.lock")):
        if (stage_dir / "losses.json").exists():
            clip = CLIPModel.from_pretrained(stage_dir)
            clip.logit_scale.requires_grad_(False)
            return clip.eval(), json.loads((stage_dir / "losses.json").read_text())
        for stale in stage_dir.parent.glob(f".tmp-{stage_dir.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        clip = train.make_clip(recipe, processor.tokenizer)
        losses = train.pretrain(clip, processor.tokenizer, pools, recipe, seed, pbar)
        tmp = stage_dir.with_name(f".tmp-{stage_dir.name}-{os.getpid()}")
        clip.save_pretrained(tmp)
        (tmp / "losses.json").write_text(json.dumps(losses))  # written last: the stage is complete
        shutil.rmtree(stage_dir, ignore_errors=True)
        os.replace(tmp, stage_dir)
    return clip, losses


def build_into(
    out: Path,
    recipe: Recipe,
    seed: int,
    tasks: Sequence[str],
    pbar: bool = True,
    stage_dir: Optional[Path] = None,
) -> dict:
    """Build everything except the manifest into ``out``; return the manifest's content."""
    import datasets
    from tqdm.auto import tqdm

    from . import data, train

    datasets.disable_progress_bars()

    timings: Dict[str, float] = {}
    t0 = t = time.perf_counter()
    train.seed_everything(seed)
    splits: Dict[str, Dict[str, data.Split]] = {}
    for task in tqdm(tasks, desc="data", disable=not pbar):
        splits[task] = {
            part: data.generate_split(task, part, n, seed) for part, n in data.sizes(recipe).items()
        }
        splits[task]["pretrain"] = pretrain_pool(
            task,
            splits[task]["pretrain"],
            recipe.domain_shift,
            recipe.rare_frac,
            recipe.common_shift,
            recipe.shift_grey,
            recipe.common_grey,
            recipe.rare_zoom,
        )
        for part in data.SPLITS:
            data.save_split(splits[task][part], task, out / "data" / task / part)
    t = _stage(timings, "data", t)

    processor = train.make_processor(out / "pretrained")
    clip, losses = pretrained_clip(
        stage_dir, recipe, seed, processor, {k: v["pretrain"] for k, v in splits.items()}, pbar
    )
    clip.save_pretrained(out / "pretrained")
    processor.save_pretrained(out / "pretrained")
    shutil.rmtree(out / "pretrained" / "tokenizer")  # the processor saved its own copy
    t = _stage(timings, "pretrain", t)

    train_acc, val_acc = {}, {}
    for i, task in enumerate(tqdm(tasks, desc="finetune", disable=not pbar)):
        head = train.zero_shot_head(clip, processor, task)
        vision = train.vision_tower(clip)
        train.seed_everything(seed * 1000 + i)
        train.finetune(
            vision,
            clip.visual_projection,
            head,
            splits[task]["train"],
            recipe,
            seed * 1000 + i,
            progress=pbar,
        )
        train_acc[task] = round(
            train.accuracy(vision, clip.visual_projection, head, splits[task]["train"]), 4
        )
        val_acc[task] = round(
            train.accuracy(vision, clip.visual_projection, head, splits[task]["val"]), 4
        )
        vision.save_pretrained(out / "models" / task)
    t = _stage(timings, "finetune", t)

    manifest = {
        "recipe_version": RECIPE_VERSION,
        "recipe": recipe.to_dict(),
        "seed": seed,
        "tasks": list(tasks),
        "libraries": library_versions(),
        "torch_threads": __import__("torch").get_num_threads(),
        "pretrain_loss": {"first": round(losses[0], 4), "last": round(losses[-1], 4)},
        "finetune_train_accuracy": train_acc,
        "finetune_val_accuracy": val_acc,
    }
    manifest["digests"] = build_digests(out)  # of the weights and data just written
    if recipe.evaluate:
        from .evaluate import evaluate_build

        manifest["test_accuracy"] = evaluate_build(out, tasks, merges=recipe.evaluate_merges)
        t = _stage(timings, "evaluate", t)
    timings["total"] = round(time.perf_counter() - t0, 2)
    manifest["timings_seconds"] = timings
    return manifest


def build_mini_benchmark(
    root: Union[None, str, Path] = None,
    seed: int = 0,
    tasks: Union[None, str, Sequence[str]] = None,
    preset: str = "default",
    force: bool = False,
    recipe: Optional[Recipe] = None,
    progress: bool = True,
) -> dict:
    """Build (or reuse) the mini benchmark; return its manifest, with ``"path"`` added.

    Args:
        root: cache directory holding builds (default: :func:`default_root`).
        seed: seeds data, pretraining and fine-tuning.
        tasks: subset of the eight task names (default: all, in TA8 order).
        preset: ``"default"`` (the benchmark) or ``"smoke"`` (tiny, for tests).
        force: rebuild even if a complete build exists.
        recipe: a custom :class:`Recipe` (variants for experiments); overrides ``preset``'s.
        progress: show tqdm progress bars.
    """
    recipe = recipe or get_recipe(preset)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"mini benchmark seed must be a non-negative integer, got {seed!r}")
    tasks = normalize_tasks(tasks)
    root = check_root(Path(root).expanduser() if root is not None else default_root())
    key = build_key(recipe, preset, seed, tasks)

    def build(tmp: Path) -> dict:
        stage_dir = root / ".stages" / pretrain_key(recipe, seed, tasks)
        if force:
            shutil.rmtree(stage_dir, ignore_errors=True)
        with torch_threads(recipe.num_threads):
            return build_into(tmp, recipe, seed, tasks, progress, stage_dir)

    return cached_build(root, key, build, force, extra={"preset": preset, "key": key})


def ensure_built(
    root: Union[None, str, Path] = None,
    seed: int = 0,
    tasks: Union[None, str, Sequence[str]] = None,
    preset: str = "default",
    progress: bool = True,
    recipe: Optional[Recipe] = None,
) -> Path:
    """Path of a complete build, building it first if needed (cheap when it exists)."""
    return Path(
        build_mini_benchmark(root, seed, tasks, preset, recipe=recipe, progress=progress)["path"]
    )
