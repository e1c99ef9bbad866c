R"""
Distil teachers of other architectures into the target architecture (StatsMerging, third
contribution).

Ranjith Merugu, Bryan Bo Cao, Shubham Jain. "StatsMerging: Statistics-Guided Model Merging via
Task-Specific Teacher Distillation", arXiv:2506.04567 (2025), §4 / Algorithm 1 line 1: when the
models to merge have different architectures, pick a target architecture and distil every model of
another architecture into it; then merge same-architecture models only.

Here the target architecture is the pool's ``_pretrained_`` CLIP vision model. Every task model
whose parameter names or shapes differ from it is a teacher (see :mod:`.teachers` for what a teacher
may be). For each teacher, a student initialised from ``_pretrained_`` and classified with the
task's frozen zero-shot head is trained on the task's **train** split (never test) to match the
teacher's own logits:

$$ \mathcal{L} = T^2\,\mathrm{KL}\big(\mathrm{softmax}(t/T)\,\|\,\mathrm{softmax}(s/T)\big)
   \quad\text{(default, label-free)}, \qquad
   \mathcal{L} = \alpha\,\mathrm{CE}(y, s) + (1-\alpha)\,T^2\,\mathrm{KL}(\cdot)
   \quad\text{(``use_labels``, the paper: } T = 4,\ \alpha = 0.7) $$

Deviations from the paper / official code (spec §4): the paper's student is a ResNet-50 with a new
fc layer; here the target is whatever ``_pretrained_`` is (a CLIP ViT), and the student keeps the
task's zero-shot head frozen, so that students merge with the other fine-tuned CLIP models exactly
like task-arithmetic fine-tunes. The official script distils truncated CLIP *embeddings* as
"logits"; here teacher logits come from the teacher's own head. Label-free is the default (the paper
uses labels).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from fusion_bench import BaseAlgorithm, auto_register_config
from fusion_bench.mixins import CLIPClassificationMixin, SimpleProfilerMixin
from fusion_bench.modelpool import CLIPVisionModelPool
from tqdm.auto import tqdm

from statsmerge_plugin.data import (
    TestSplitGuard,
    dataset_record,
    held_out_indices,
)
from statsmerge_plugin.validation import (
    check_bool,
    check_int,
    check_writable_dir,
    existing_artefacts,
)

from .cache import (
    cached_student,
    default_cache_dir,
    module_digest,
    save_student,
    state_digest,
    student_cache_key,
    student_lock,
    tensor_digest,
)
from .distill import DistillOptions, distill, plan_batches
from .pool_plan import PoolPlan, inspect_pool, plain
from .pool_plan import student_pool as build_student_pool
from .pool_plan import write_student_pool
from .report import accuracy
from .stream import LabelledPairs, PairedViews, images_digest, read_labels, used_positions
from .teachers import Teacher, processor_identity

log = logging.getLogger(__name__)

#: What ``run`` writes into ``output_dir``; an earlier run's copies are never replaced silently.
OUTPUT_ENTRIES = ("students", "modelpool", "report.json", "report.md")


@auto_register_config
class DistillToBaseForCLIP(CLIPClassificationMixin, SimpleProfilerMixin, BaseAlgorithm):
    """Distil every other-architecture task model of a CLIP pool into the ``_pretrained_`` one.

    ``run`` writes the students and a ready-to-use model pool YAML (``_pretrained_``, the
    same-architecture models and the students) so that any FusionBench method can merge them, plus a
    student-vs-teacher report, and returns ``None`` (FusionBench then skips evaluation: there is no
    merged model yet).

    Args:
        temperature: KL temperature ``T`` (paper: 4).
        alpha: weight of the label cross-entropy with ``use_labels`` (paper: 0.7).
        use_labels: ``False``: label-free KL on unlabelled train images (default). ``True``: the
            paper's ``alpha * CE + (1 - alpha) * T^2 * KL`` with train labels.
        max_steps: optimiser steps per student (``fast_dev_run``: 1).
        lr: AdamW peak learning rate (warm-up + cosine).
        weight_decay: AdamW weight decay.
        warmup_fraction: fraction of steps with linear warm-up.
        batch_size: images per step.
        augmentation: ``none``, ``flip``, ``crop`` or ``flip_crop`` (same parameters for both
          views).
        crop_fraction: maximal crop offset, as a fraction of the image size.
        seed: seeds the image subset, batch order and augmentation.
        num_train_images: images of the train split a teacher's steps draw from (``null``: all);
            images are streamed batch by batch and only the ones the steps use are labelled.
        num_workers: ``DataLoader`` workers that load and process the training images.
        micro_batch_size: forward/backward in chunks of this many images with accumulated
            gradients (the same steps, the activation memory of a chunk); ``null``: whole batches.
        cache_dir: student cache (``null``: ``$STATSMERGE_STUDENT_CACHE`` or the user cache dir).
        teachers: optional per-teacher overrides ``{task: {processor: ..., clip_model: ...}}``
            (default: both are loaded from the directory the teacher was loaded from).
        evaluate_test: evaluate teachers, students and ``_pretrained_`` on the test split (report
          only).
        eval_batch_size: batch size of that evaluation.
        output_dir: where ``run`` writes students, pool YAML and report (``null``:
            ``<log_dir>/distill_to_base``).
        pool_name: file name (without ``.yaml``) of the written model pool config.
        overwrite: allow replacing an earlier run's students, pool config and report in
            ``output_dir`` (and, under the CLI, the log dir's files). Off: such a run stops before
            any work.
    """

    def __init__(
        self,
        temperature: float = 4.0,
        alpha: float = 0.7,
        use_labels: bool = False,
        max_steps: int = 300,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_fraction: float = 0.05,
        batch_size: int = 64,
        augmentation: str = "none",
        crop_fraction: float = 0.125,
        seed: int = 0,
        num_train_images: Optional[int] = None,
        num_workers: int = 0,
        micro_batch_size: Optional[int] = None,
        cache_dir: Optional[str] = None,
        teachers: Optional[Dict[str, Dict[str, Any]]] = None,
        evaluate_test: bool = True,
        eval_batch_size: int = 256,
        output_dir: Optional[str] = None,
        pool_name: str = "distilled",
        overwrite: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.distill_options()  # validates every option now, naming the culprit
        if num_train_images is not None:
            check_int("num_train_images", num_train_images)
        check_int("num_workers", num_workers, minimum=0)
        check_int("micro_batch_size", micro_batch_size, allow_none=True)
        check_int("eval_batch_size", eval_batch_size)
        check_bool("overwrite", overwrite)
        if teachers is not None and not isinstance(plain(teachers), dict):
            raise ValueError(
                "option `teachers` must map task names to {processor, clip_model} overrides"
            )

    def distill_options(self) -> DistillOptions:
        return DistillOptions(
            temperature=float(self.temperature),
            alpha=float(self.alpha),
            use_labels=self.use_labels,
            max_steps=self.max_steps,
            lr=float(self.lr),
            weight_decay=float(self.weight_decay),
            warmup_fraction=float(self.warmup_fraction),
            batch_size=self.batch_size,
            augmentation=self.augmentation,
            crop_fraction=float(self.crop_fraction),
            seed=self.seed,
        )

    # ------------------------------------------------------------------------------------------
    def run(self, modelpool: CLIPVisionModelPool):
        out = self.check_output_dir()  # before any work
        student_pool, report = self.distill_pool(modelpool)
        if self.fabric.is_global_zero:
            write_student_pool(
                out, self.pool_name, student_pool, report, getattr(self, "_loss_curves", {})
            )
        self.print_profile_summary()
        return None

    def check_output_dir(self) -> Path:
        """``output_dir`` (else ``<log_dir>/distill_to_base``): writable, and without an earlier
        run's outputs unless ``overwrite``.

        Raises:
            ValueError: naming the directory (and what it already holds).
        """
        if self.output_dir is not None:
            out = self.output_dir
        elif self.log_dir is not None:
            out = Path(self.log_dir) / "distill_to_base"
        else:
            raise ValueError("distill_to_base needs `output_dir` (there is no log directory)")
        out = check_writable_dir(out, "`output_dir`")
        found = existing_artefacts(out, OUTPUT_ENTRIES)
        if found and not self.overwrite:
            raise ValueError(
                f"`output_dir` {str(out)!r} already holds an earlier run's outputs ({found}); "
                "refusing to overwrite them: choose another `output_dir`, or pass "
                "`method.overwrite=true` to replace them"
            )
        return out

    def split_guard(self, modelpool) -> TestSplitGuard:
        """The test sets of the model pool and of the program's task pool (never training data)."""
        return TestSplitGuard(modelpool, getattr(getattr(self, "_program", None), "taskpool", None))

    def distill_pool(self, modelpool: CLIPVisionModelPool) -> Tuple[CLIPVisionModelPool, Dict]:
        """Check the pool, distil (or fetch from cache) each teacher; return student pool, report.

        The returned pool holds ``_pretrained_``, the same-architecture entries unchanged and one
        saved student per teacher (a path), with the input pool's processor and datasets.
        """
        start = time.time()
        self.modelpool = modelpool
        self._guard = self.split_guard(modelpool)
        plan = self.inspect_pool(modelpool)
        if not plan.teachers:
            log.warning(
                "heterogeneous merging: every task model has the target architecture, "
                "nothing to distil"
            )
        teacher_tasks = list(plan.teachers)
        students: Dict[str, Path] = {}
        records: Dict[str, Dict] = {}
        losses: Dict[str, List[float]] = {}
        if teacher_tasks:
            self.setup_zero_shot_classification_head(task_names=teacher_tasks)
            with self.profile("base digest"):
                base = modelpool.load_pretrained_model()
                base_id = module_digest(base)
                del base
            for task in tqdm(
                teacher_tasks, "distil teachers", disable=not self.fabric.is_global_zero
            ):
                students[task], records[task], losses[task] = self.distill_teacher(
                    modelpool, plan.teachers[task], base_id
                )
        student_pool = build_student_pool(modelpool, plan, students)
        report = {
            "target": plan.target,
            "same_architecture": plan.same_architecture,
            "teachers": records,
            "cache_dir": str(self.resolved_cache_dir()),
            "options": self.distill_options().key()
            | {
                "num_train_images": self.num_train_images,
                "num_workers": self.num_workers,
                "micro_batch_size": self.micro_batch_size,
            },
            "fast_dev_run": bool(self.is_debug_mode),
        }
        if self.evaluate_test and teacher_tasks:
            with self.profile("test evaluation (report only)"):
                self.evaluate(modelpool, plan, students, records)
        report["wall_time_s"] = round(time.time() - start, 2)
        self._loss_curves = losses
        return student_pool, report

    # ------------------------------------------------------------------------------------------
    def inspect_pool(self, modelpool) -> PoolPlan:
        """:func:`~.pool_plan.inspect_pool` with this run's teacher overrides and test-split guard."""
        with self.profile("inspect pool"):
            return inspect_pool(modelpool, self.teachers, self._guard)

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()

    def steps(self) -> int:
        return 1 if self.is_debug_mode else self.max_steps

    # ------------------------------------------------------------------------------------------
    def distill_teacher(self, modelpool, teacher: Teacher, base_id: str):
        """Distil one teacher (or fetch its student from the cache); return path, record, losses."""
        task = teacher.task
        options = self.distill_options()
        with self.profile("train split: identify the used images"):
            train = modelpool.load_train_dataset(task)
            self._guard.check_dataset(task, "train", train)
            indices = held_out_indices(len(train), self.num_train_images, self.seed, task, "train")
            batches, _ = plan_batches(len(indices), options, self.steps())
            used_rows = [indices[p] for p in used_positions(batches)]
            views = (LabelledPairs if options.use_labels else PairedViews)(
                train, self.clip_processor, teacher.processor, indices
            )
            labels = read_labels(train, used_rows) if options.use_labels else None
        head = self.zeroshot_weights[task]
        key = student_cache_key(
            teacher={
                "task": task,
                "kind": teacher.kind,
                "config": teacher.config,
                "weights": module_digest(teacher.model),
                "head": state_digest(teacher.head_state()),
                "processor": processor_identity(teacher.processor),
            },
            data={
                "split": "train",
                "num_images": len(indices),
                "images_used": images_digest(train, used_rows),  # in order of first use
                "labels": None if labels is None else tensor_digest(labels),
            },
            options=options.key()
            | {
                "steps": self.steps(),
                "student_init": base_id,
                "student_head": tensor_digest(
                    head, self.visual_projection.weight, self.logit_scale_exp
                ),
                "student_processor": processor_identity(self.clip_processor),
            },
        )
        cache_dir = self.resolved_cache_dir()
        record = {
            "teacher_kind": teacher.kind,
            "teacher_class": type(teacher.model).__name__,
            "teacher_source": teacher.source,
            "use_labels": options.use_labels,
            "steps": self.steps(),
            "num_train_images": len(indices),
            "images_used": len(used_rows),
            "train_data": dataset_record(train, "train"),
            "cache_key": key,
        }
        start = time.time()
        with student_lock(cache_dir, key):
            hit = cached_student(cache_dir, key)
            if hit is not None:
                import json

                manifest = json.loads((hit / "manifest.json").read_text())
                log.info(f"task {task!r}: student found in the cache ({hit})")
                record |= {"cache_hit": True, "student_path": str(hit), "distill_seconds": 0.0}
                record["final_loss"] = manifest.get("final_loss")
                return hit, record, manifest.get("losses", [])
            teacher.to_device(self.fabric.device)
            student = self.to_device(modelpool.load_pretrained_model())
            student.requires_grad_(True)
            with self.profile("distillation"), _offloaded_after(teacher):
                result = distill(
                    student,
                    lambda module, pixels: self.compute_logits(module, pixels, task),
                    teacher.logits,
                    views,
                    options,
                    steps=self.steps(),
                    device=self.fabric.device,
                    num_workers=self.num_workers,
                    micro_batch_size=self.micro_batch_size,
                    desc=("[DEBUG MODE] " if self.is_debug_mode else "") + f"distil {task}",
                    progress=self.fabric.is_global_zero,
                )
            losses = result.losses
            seconds = round(time.time() - start, 2)
            student.requires_grad_(False)
            path = save_student(
                cache_dir,
                key,
                student.cpu(),
                {
                    "task": task,
                    "teacher": {
                        k: record[k] for k in ("teacher_kind", "teacher_class", "teacher_source")
                    },
                    "options": options.key(),
                    "steps": self.steps(),
                    "num_train_images": len(indices),
                    "data_split": "train",
                    "final_loss": losses[-1] if losses else None,
                    "losses": losses,
                    "distill_seconds": seconds,
                },
            )
        record |= {
            "cache_hit": False,
            "student_path": str(path),
            "distill_seconds": seconds,
            "step_seconds": result.step_seconds,
            "teacher_labelled": result.teacher_labelled,
            "final_loss": losses[-1] if losses else None,
        }
        return path, record, losses

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(
        self, modelpool, plan: PoolPlan, students: Dict[str, Path], records: Dict[str, Dict]
    ):
        """Test accuracy of teacher, student and ``_pretrained_`` per teacher task (report only)."""
        from transformers import CLIPVisionModel

        device = self.fabric.device
        max_batches = 1 if self.is_debug_mode else None
        base = self.to_device(modelpool.load_pretrained_model()).eval()
        for task, teacher in plan.teachers.items():
            record = records[task]
            if task not in modelpool.test_dataset_names:
                record.update(
                    teacher_accuracy=None, student_accuracy=None, pretrained_accuracy=None
                )
                log.warning(f"task {task!r}: no test dataset in the pool, accuracies not reported")
                continue
            test = modelpool.load_test_dataset(task)
            student = self.to_device(CLIPVisionModel.from_pretrained(students[task])).eval()

            def zero_shot(module):
                return lambda pixels: self.compute_logits(module, pixels, task)

            kw = dict(batch_size=self.eval_batch_size, device=device, max_batches=max_batches)
            with _offloaded_after(teacher.to_device(device)):
                record["teacher_accuracy"] = accuracy(teacher.logits, test, teacher.processor, **kw)
            record["student_accuracy"] = accuracy(
                zero_shot(student), test, self.clip_processor, **kw
            )
            record["pretrained_accuracy"] = accuracy(
                zero_shot(base), test, self.clip_processor, **kw
            )
            t = record["teacher_accuracy"]
            record["student_over_teacher"] = record["student_accuracy"] / t if t else None
            del student

    # ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _offloaded_after(teacher: Teacher):
    """Move ``teacher`` back to host memory when the block ends, also on an error (issue 19: one
    teacher at a time on the compute device)."""
    try:
        yield teacher
    finally:
        teacher.offload()
