"""What a heterogeneous pool holds, and the pool that replaces it: the target (``_pretrained_``), the
same-architecture models and the teachers (:func:`inspect_pool`, every input check before any
training), then the pool of ``_pretrained_``, the same-architecture models and the distilled students
(:func:`student_pool`), written as a FusionBench model pool YAML by :func:`write_student_pool`."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from fusion_bench.modelpool import CLIPVisionModelPool
from omegaconf import DictConfig

from statsmerge_plugin.data import TestSplitGuard
from statsmerge_plugin.data import plain_config as plain
from statsmerge_plugin.data import resolve_held_out_source
from statsmerge_plugin.validation import check_task_classnames

from .report import write_report
from .teachers import (
    Teacher,
    build_teacher,
    is_clip_vision_model,
    parameter_shapes,
    same_architecture,
)

log = logging.getLogger(__name__)


@dataclass
class PoolPlan:
    """What the pool holds: the target, the same-architecture models and the teachers."""

    target: str
    tasks: List[str]
    same_architecture: List[str] = field(default_factory=list)
    teachers: Dict[str, Teacher] = field(default_factory=dict)


def inspect_pool(modelpool, overrides: Optional[Dict[str, Any]], guard: TestSplitGuard) -> PoolPlan:
    """All input checks of a heterogeneous pool, before any training: one clear error naming the
    culprit. ``overrides`` are the per-teacher overrides, ``guard`` the test sets never to train on.

    Raises:
        ValueError: no ``_pretrained_`` target, a target that is not a CLIP vision model, no task
            models, a task without FusionBench class names, a teacher without a usable head or
            processor, a teacher/task class-count mismatch, a teacher without a train split, an
            override for an unknown task.
    """
    from fusion_bench.tasks.clip_classification import get_classnames_and_templates

    if not modelpool.has_pretrained:
        raise ValueError(
            "the model pool has no `_pretrained_` model: heterogeneous merging distils every "
            "teacher into the target architecture, which is the pool's `_pretrained_` "
            f"(pool models: {modelpool.all_model_names})"
        )
    tasks = list(modelpool.model_names)
    if not tasks:
        raise ValueError("the model pool has no task models besides `_pretrained_`")
    overrides = plain(overrides) or {}
    unknown = sorted(set(overrides) - set(tasks))
    if unknown:
        raise ValueError(f"option `teachers` names tasks that are not in the pool: {unknown}")
    base = modelpool.load_pretrained_model()
    if not is_clip_vision_model(base):
        raise ValueError(
            f"`_pretrained_` is a {type(base).__name__}, not a CLIP vision model: the "
            "target architecture must be a CLIP vision model (its zero-shot heads "
            "classify the students)"
        )
    check_task_classnames(tasks)
    base_shapes = parameter_shapes(base)
    plan = PoolPlan(target=f"{type(base).__name__}, {len(base_shapes)} tensors", tasks=tasks)
    del base
    for task in tasks:
        model = modelpool.load_model(task)
        if same_architecture(base_shapes, parameter_shapes(model)):
            plan.same_architecture.append(task)
            if task in overrides:
                raise ValueError(
                    f"option `teachers.{task}`: {task!r} is not a teacher " "(same architecture)"
                )
            continue
        classnames, templates = get_classnames_and_templates(task)
        plan.teachers[task] = build_teacher(
            task,
            model,
            classnames,
            templates,
            override=overrides.get(task),
            config=plain(modelpool.get_model_config(task)),
        )
        # a train split, and none of the model pool's or task pool's test sets
        resolve_held_out_source(modelpool, task, "train", guard)
        log.info(f"task {task!r}: teacher ({plan.teachers[task].kind}, {type(model).__name__})")
    return plan


def student_pool(modelpool, plan: PoolPlan, students: Dict[str, Path]) -> CLIPVisionModelPool:
    """The pool to merge: ``_pretrained_``, same-architecture entries, students (task order)."""
    models = {"_pretrained_": plain(modelpool.get_model_config("_pretrained_"))}
    for task in plan.tasks:
        models[task] = (
            str(students[task]) if task in students else plain(modelpool.get_model_config(task))
        )
    datasets = {
        f"{split}_datasets": (
            DictConfig(plain(getattr(modelpool, f"_{split}_datasets")))
            if getattr(modelpool, f"_{split}_datasets", None) is not None
            else None
        )
        for split in ("train", "val", "test")
    }
    return CLIPVisionModelPool(
        DictConfig(models),
        processor=plain(modelpool._processor),
        platform=getattr(modelpool, "_platform", "hf"),
        **datasets,
    )


def write_student_pool(
    out: Path, pool_name: str, student_pool: CLIPVisionModelPool, report: Dict, loss_curves: Dict
) -> Path:
    """Students (copied from the cache), ``modelpool/<pool_name>.yaml``, report into ``out``."""
    out = Path(out)
    (out / "modelpool").mkdir(parents=True, exist_ok=True)
    models = plain(student_pool._models)
    for task, record in report["teachers"].items():
        dst = out / "students" / task
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(record["student_path"], dst)
        models[task] = str(dst.resolve())
    pool = {
        "_target_": "fusion_bench.modelpool.CLIPVisionModelPool",
        "_recursive_": False,
        "processor": plain(student_pool._processor),
        "platform": student_pool._platform,
        "models": models,
    }
    for split in ("train", "val", "test"):
        cfg = plain(getattr(student_pool, f"_{split}_datasets", None))
        if cfg:
            pool[f"{split}_datasets"] = cfg
    header = (
        "# FusionBench model pool written by method=statsmerging/distill_to_base\n"
        "# _pretrained_ and the same-architecture models as in the input pool; every teacher\n"
        "# of another architecture replaced by its distilled student (a CLIPVisionModel\n"
        "# in students/).\n"
        f"# Use: fusion_bench --config-dir {out.resolve()} modelpool={pool_name} "
        "method=<any> taskpool=<...>\n"
    )
    (out / "modelpool" / f"{pool_name}.yaml").write_text(
        header + yaml.safe_dump(pool, sort_keys=False)
    )
    report = dict(report, modelpool_yaml=str((out / "modelpool" / f"{pool_name}.yaml").resolve()))
    write_report(out, report, loss_curves)
    log.info(f"distill_to_base: students, pool config and report written to {out}")
    return out
