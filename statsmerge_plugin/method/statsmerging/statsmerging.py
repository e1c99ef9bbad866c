R"""
StatsMerging: statistics-guided model merging via task-specific teacher distillation.

Ranjith Merugu, Bryan Bo Cao, Shubham Jain. "StatsMerging: Statistics-Guided Model Merging via
Task-Specific Teacher Distillation", arXiv:2506.04567 (2025).

Merge rule (Algorithm 1, line 19), for every merged parameter tensor l ("layer" = parameter tensor, as in
AdaMerging and FusionBench's ``LayerWiseMergedModel``):

$$ \theta^l = \theta_0^l + \sum_k \lambda_k^l \tau_k^l, \qquad
   \lambda^l = s \cdot \mathrm{softmax}_k\big(f(S_k^l)\big), \quad
   S_k^l = [\mu, \sigma^2, \|\cdot\|_2, \sigma'_1, \dots, \sigma'_r](\tau_k^l) $$

``f`` is the StatsMergeLearner; only ``f`` (and, with ``scale=learned``, the overall scale ``s``; the
paper's ``s = 1``) is trained. Its loss is task-specific teacher distillation (§3.3): fine-tuned model
k with task k's frozen zero-shot head labels task k's *unlabelled* images and the merged model is
trained to agree (hard pseudo-label cross-entropy, or KL).

This class only wires FusionBench's pool, data, Fabric and logging; the math is in
:mod:`.statistics`, :mod:`.learner`, :mod:`.distillation` and :mod:`.merge`.

Implementation notes, and deliberate deviations from the official code (spec §2, §6):

* Training data are unlabelled images from a split held out of training data (the pool's val split, else a
  seeded slice of train); the official code trains (and selects checkpoints) on *test-split ground truth*.
  Here the test split is never read: :mod:`statsmerge_plugin.data` refuses it and drops labels. Model
  selection (``selection``), when asked for, uses a held-out part of those same images and the
  teachers' labels, never the test split and never ground truth.
* Only the learner is trained; the official code also trains the classification heads.
* Statistics are per task (the paper's S_k^l); the official code pools them over tasks. That pooled,
  per-tensor-MLP design is available as ``learner=per_tensor``; ``learner=free`` is a free logit table
  under the same loss, the control that isolates what the statistics contribute. Each mode has its own
  default learning rate (``lr=null``), under which it can reach any coefficient table.
* One merged forward per step: every task's images are concatenated and encoded once, each task's head
  is applied to its slice (the official code runs one forward per task).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from fusion_bench import BaseAlgorithm, auto_register_config
from fusion_bench.mixins import CLIPClassificationMixin, SimpleProfilerMixin
from fusion_bench.modelpool import CLIPVisionModelPool
from tqdm.auto import tqdm

from statsmerge_plugin.data import (
    HELD_OUT_SOURCES,
    TestSplitGuard,
    held_out_images,
    resolve_held_out_source,
    stack_images,
)
from statsmerge_plugin.memory import release_free_memory
from statsmerge_plugin.method.openclip import OpenCLIPSupportMixin, load_classification_heads
from statsmerge_plugin.method.statsmerging.distillation import (
    DISTILLATION_LOSSES,
    TASK_WEIGHTINGS,
    agreement,
    combine_task_losses,
    task_logits,
    task_loss,
)
from statsmerge_plugin.method.statsmerging.learner import (
    DEFAULT_LR,
    LEARNER_MODES,
    LR_SCHEDULES,
    OUTPUT_NORMS,
    SCALE_MODES,
    SELECTION_MODES,
    ModelSelector,
    OptimiserSettings,
    StatsMergeLearner,
    build_optimiser,
    coefficient_movement,
)
from statsmerge_plugin.method.statsmerging.merge import (
    LeafMerge,
    SavedActivations,
    TaskVectorMerge,
)
from statsmerge_plugin.method.statsmerging.statistics import (
    FEATURE_GROUPS,
    FEATURE_NORMS,
    FeatureNormalizer,
    check_feature_groups,
    feature_columns,
    feature_names,
    pool_task_wise,
    pooled_model_statistics,
    tensor_statistics,
)
from statsmerge_plugin.model_io import (
    canonical_buffers,
    canonical_parameters,
    load_pool_model,
    open_reader,
    weight_groups,
)
from statsmerge_plugin.threads import configure_torch_threads
from statsmerge_plugin.validation import (
    check_bool,
    check_choice,
    check_compatible,
    check_finite,
    check_finite_coefficients,
    check_finite_gradients,
    check_finite_loss,
    check_int,
    check_model_weights,
    check_output_locations,
    check_pool_models,
    check_positive,
    check_task_classnames,
    trainable_state,
)

log = logging.getLogger(__name__)

PRETRAINED = "_pretrained_"
GRANULARITIES = ("layer_wise", "task_wise")
STATS_SOURCES = ("task_vector", "finetuned")
SELECTION_METRICS = ("agreement", "loss")
#: the smallest start loss ``task_weighting=relative`` divides by
MIN_START_LOSS = 1e-6
#: activations one backward pass of a training step may hold: tasks are back-propagated together
#: while their saved activations fit, else one at a time (a ViT-B/32 image at 224 px saves ~37 MB)
ACTIVATION_BUDGET_BYTES = 256 * 2**20


class StreamedImages:
    """A task's unlabelled images processed when used, a batch at a time, instead of held as one
    tensor: what :meth:`StatsMergingForCLIP.load_images` gives for ``num_unlabelled_per_task:
    null`` (the whole held-out split, e.g. SVHN's 7.3k validation images, 4.4 GB at 224 px).

    ``batch(idx)`` processes those images (the values ``stack_images`` would hold: the same
    processing, image by image), ``split(n)`` iterates over all of them in batches of ``n``,
    ``subset(idx)`` selects some without processing any.
    """

    def __init__(self, images, positions: Optional[Sequence[int]] = None):
        self.images = images
        self.positions = list(range(len(images))) if positions is None else list(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def batch(self, idx) -> torch.Tensor:
        return torch.stack([self.images[self.positions[int(i)]] for i in idx])

    def subset(self, idx) -> "StreamedImages":
        return StreamedImages(self.images, [self.positions[int(i)] for i in idx])

    def split(self, size: int):
        for first in range(0, len(self), size):
            yield self.batch(range(first, min(first + size, len(self))))


def take(images, idx) -> torch.Tensor:
    """The images at ``idx`` of a stacked tensor or of :class:`StreamedImages`, as a tensor."""
    return images.batch(idx) if isinstance(images, StreamedImages) else images[idx]


def select(images, idx):
    """The images at ``idx``, of the same kind (a tensor, or :class:`StreamedImages`)."""
    return images.subset(idx) if isinstance(images, StreamedImages) else images[idx]


def fresh_dir(parent: Path, name: str) -> Path:
    """``parent/name``, or ``name_1``, ``name_2``... if taken: earlier outputs are never overwritten."""
    path, i = parent / name, 0
    while path.exists():
        i += 1
        path = parent / f"{name}_{i}"
    path.mkdir(parents=True)
    return path


@auto_register_config
class StatsMergingForCLIP(
    OpenCLIPSupportMixin, CLIPClassificationMixin, SimpleProfilerMixin, BaseAlgorithm
):
    """StatsMerging for CLIP vision models: FusionBench's ``CLIPVisionModelPool`` (Hugging Face CLIP)
    or ``OpenCLIPVisionModelPool`` (open_clip ``ImageEncoder``s with the pool's classification heads,
    e.g. the ``task_vectors`` checkpoints; see :mod:`statsmerge_plugin.method.openclip`).

    Args:
        granularity: ``layer_wise`` (one coefficient per task and parameter tensor) or ``task_wise``
            (one per task).
        learner: ``shared`` (one MLP on per-task statistics, the paper), ``per_tensor`` (one MLP per
            tensor on statistics pooled over tasks, the official code) or ``free`` (a free logit table).
        stats_source: statistics of the ``task_vector`` (theta_k - theta_0) or of the ``finetuned`` weights.
        stat_features: the statistics the learner sees, any of ``mean``, ``variance``, ``l2_norm``,
            ``singular_values`` (the paper's feature ablation adds them in this order).
        svd_rank: number r of top singular values in the statistics.
        svd_exact_max_numel: tensors up to this many elements get an exact SVD, larger ones a randomized
            top-r SVD.
        feature_norm: ``none`` (paper), ``standardize``, ``log_abs`` or ``log_standardize``, per
            feature, fitted over every task and tensor (so it works for task-wise rows too).
        hidden_dim: hidden width of the learner's MLP(s).
        output_norm: ``softmax`` / ``relu`` / ``none`` over tasks.
        scale: ``fixed`` (coefficients times ``init_scale``) or ``learned`` (an overall scale learned
            from ``init_scale``, with its own learning rate ``scale_lr``).
        init_scale: the (initial) overall scale; 1 with softmax is the paper's convex merge.
        zero_init_output: start the ``shared`` / ``per_tensor`` MLP at zero logits (its output layer's
            weights zeroed), i.e. exactly at the merge the free table starts at; off: the default
            (random) initialisation of the paper and the official code.
        loss: ``ce_hard`` (teacher pseudo-labels) or ``kl_soft``.
        temperature: temperature of ``kl_soft``.
        task_weighting: ``sum`` (paper), ``relative`` (each task's loss over its value at the start)
            or ``confidence`` (every image's loss weighted by its teacher's confidence).
        lr: Adam learning rate; ``None``: the learner mode's default (:data:`DEFAULT_LR`).
        lr_schedule: ``step`` (StepLR(lr_step_size, lr_gamma), paper), ``cosine`` or ``constant``.
        lr_step_size, lr_gamma: of the ``step`` schedule (stepped every optimiser step).
        scale_lr: Adam learning rate of the learned scale (same schedule).
        max_steps: optimiser steps ("epochs" in the paper); ``fast_dev_run`` runs one.
        batch_size_per_task: unlabelled images of every task per step.
        num_unlabelled_per_task: unlabelled images per task (``null``: the whole held-out split).
        data_source: ``auto`` (val split if the pool has one, else a seeded slice of train), ``val`` or
            ``train``; never ``test``.
        selection: ``none`` (the last step, paper), ``best`` (the best evaluated step) or
            ``early_stop`` (``best``, stopping after ``patience`` evaluations without improvement),
            evaluated on a held-out part of the unlabelled images, never trained on.
        selection_fraction: the part of each task's unlabelled images held out for ``selection``.
        selection_metric: ``agreement`` (with the teachers' labels, averaged over tasks) or ``loss``
            (the training objective, lower is better).
        eval_every: steps between selection evaluations (the start and the last step are evaluated too).
        patience: evaluations without improvement before ``early_stop`` stops.
        teacher_batch_size: batch size when labelling images with the teachers (and evaluating).
        merge_in_place: hold each step's (and each evaluation's) merge in theta_0's own storage and
            restore theta_0 afterwards, instead of building a second model-sized copy next to it
            (ViT-B/32: 0.33 GiB, ViT-L/14: 1.13 GiB less at the peak). The restore is exact up to float
            rounding (~3e-7 relative drift of theta_0 over 500 steps); the final merge starts from
            theta_0 reloaded from the pool, so the merged model is exactly theta_0 + sum_k lambda_k tau_k.
        seed: seeds data sampling and the learner's initialisation.
        save_outputs: write coefficients, statistics, loss curve and heatmap into the log dir.
        overwrite: allow replacing an earlier run's files (an existing, non-empty
            ``merged_model_save_path``, the program's report; under the CLI also the log dir's
            ``config.yaml``, ...). Off by default: such a run stops before any work. This method's own
            outputs are never overwritten (a second run writes ``statsmerging_1/``).
    """

    def __init__(
        self,
        granularity: str = "layer_wise",
        learner: str = "per_tensor",
        stats_source: str = "task_vector",
        stat_features: Sequence[str] = FEATURE_GROUPS,
        svd_rank: int = 3,
        svd_exact_max_numel: int = 4_000_000,
        feature_norm: str = "standardize",
        hidden_dim: int = 256,
        output_norm: str = "none",
        scale: str = "fixed",
        init_scale: float = 2.4,
        zero_init_output: bool = True,
        loss: str = "ce_hard",
        temperature: float = 1.0,
        task_weighting: str = "sum",
        lr: Optional[float] = None,
        lr_schedule: str = "cosine",
        lr_step_size: int = 100,
        lr_gamma: float = 0.1,
        scale_lr: float = 0.01,
        max_steps: int = 500,
        batch_size_per_task: int = 4,
        num_unlabelled_per_task: Optional[int] = 128,
        data_source: str = "auto",
        selection: str = "none",
        selection_fraction: float = 0.25,
        selection_metric: str = "agreement",
        eval_every: int = 25,
        patience: int = 4,
        teacher_batch_size: int = 64,
        merge_in_place: bool = True,
        seed: int = 0,
        save_outputs: bool = True,
        overwrite: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.check_options()

    def check_options(self) -> None:
        """Reject invalid option values at construction, naming the option."""
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_choice("learner", self.learner, LEARNER_MODES)
        check_choice("stats_source", self.stats_source, STATS_SOURCES)
        check_choice("feature_norm", self.feature_norm, FEATURE_NORMS)
        check_choice("output_norm", self.output_norm, OUTPUT_NORMS)
        check_choice("scale", self.scale, SCALE_MODES)
        check_choice("loss", self.loss, DISTILLATION_LOSSES)
        check_choice("task_weighting", self.task_weighting, TASK_WEIGHTINGS)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("data_source", self.data_source, HELD_OUT_SOURCES)
        check_choice("selection", self.selection, SELECTION_MODES)
        check_choice("selection_metric", self.selection_metric, SELECTION_METRICS)
        self.stat_features = check_feature_groups(plain_list(self.stat_features))
        check_int("svd_rank", self.svd_rank, minimum=0)
        for option in (
            "svd_exact_max_numel",
            "hidden_dim",
            "lr_step_size",
            "max_steps",
            "batch_size_per_task",
            "teacher_batch_size",
            "eval_every",
            "patience",
        ):
            check_int(option, getattr(self, option))
        check_int("num_unlabelled_per_task", self.num_unlabelled_per_task, allow_none=True)
        check_int("seed", self.seed, minimum=0)
        check_positive("lr", self.lr, allow_none=True)
        for option in ("temperature", "lr_gamma", "init_scale", "scale_lr"):  # finite, > 0
            check_positive(option, getattr(self, option))
        check_positive("selection_fraction", self.selection_fraction)
        if self.selection_fraction >= 1:
            raise ValueError(
                f"invalid value {self.selection_fraction!r} for option `selection_fraction`: "
                "expected a fraction in (0, 1)"
            )
        check_bool("zero_init_output", self.zero_init_output)
        check_bool("merge_in_place", self.merge_in_place)
        check_bool("save_outputs", self.save_outputs)
        check_bool("overwrite", self.overwrite)
        if self.learner == "per_tensor" and self.stats_source != "task_vector":
            raise ValueError(
                "option `stats_source=finetuned` is not available with `learner=per_tensor`: "
                "the official per-tensor features are statistics of the task vectors"
            )

    def optimiser_settings(self) -> OptimiserSettings:
        """The optimiser of this run (``lr=None``: the learner mode's default learning rate)."""
        return OptimiserSettings(
            lr=float(self.lr if self.lr is not None else DEFAULT_LR[self.learner]),
            schedule=self.lr_schedule,
            step_size=self.lr_step_size,
            gamma=self.lr_gamma,
            scale_lr=float(self.scale_lr),
        )

    # ------------------------------------------------------------------------------------------------
    def run(self, modelpool: CLIPVisionModelPool):
        self.check_options()
        self.modelpool = modelpool
        configure_torch_threads()
        torch.manual_seed(self.seed)
        start = time.time()
        tasks = list(modelpool.model_names)
        # --- every check before any long work: pool, tasks, data sources, outputs, models --------
        check_pool_models(modelpool)
        if self.is_openclip:  # heads come from the pool: every task has one, and it loads
            load_classification_heads(modelpool, tasks)
        else:
            check_task_classnames(tasks)
        guard = TestSplitGuard(modelpool, getattr(self._program, "taskpool", None))
        for t in tasks:
            resolve_held_out_source(modelpool, t, self.data_source, guard)
        self.check_outputs()
        with self.profile("load pretrained model"):
            base = load_pool_model(modelpool, PRETRAINED)
            base.requires_grad_(False)
            base_state = trainable_state(base)
            check_finite(PRETRAINED, base_state)
            names = list(base_state)
        with self.profile("validate task models"):
            self.validate_task_models(tasks, base)

        with self.profile("load unlabelled data"):
            images, data_read = self.load_images(modelpool, tasks, guard)

        self.setup_zero_shot_classification_head(task_names=tasks)
        base = self.to_device(base).eval()

        base_state = trainable_state(base)  # on the compute device now
        task_vectors, features, teacher = self.load_task_models(tasks, base_state, images)
        train, held = self.split_for_selection(tasks, images, teacher, data_read)
        target = TaskVectorMerge(base, base_state, task_vectors)
        learner_features = self.learner_features(task_vectors, features, names)
        release_free_memory()  # what loading and the statistics freed, before training
        coefficients, losses, report = self.train_learner(
            tasks, target, learner_features, *train, held
        )
        release_free_memory()  # the training steps' activations, before the final merge

        # nothing non-finite is ever saved or evaluated
        columns = names if coefficients.shape[1] == len(names) else ["all tensors"]
        check_finite_coefficients("StatsMerging", coefficients, tasks, columns)
        with torch.no_grad():
            if self.merge_in_place:  # theta_0 as loaded (without the in-place merges' rounding),
                with self.profile("reload pretrained model"):  # then merged in its own storage
                    base.load_state_dict(load_pool_model(modelpool, PRETRAINED).state_dict())
                check_finite("merged model", target.merge_(coefficients))
            else:
                merged_state = target.state(coefficients)
                check_finite("merged model", merged_state)
                base.load_state_dict(merged_state, strict=False)
        summary = {
            "method": "statsmerging",
            "granularity": self.granularity,
            "learner": self.learner,
            "tasks": tasks,
            "num_tensors": len(names),
            "steps": len(losses),
            "final_loss": losses[-1] if losses else None,
            **report,
            "world_size": self.fabric.world_size,
            "rank_max_abs_diff": self.rank_max_abs_diff,
            "unlabelled_data": data_read,
            "wall_time_s": round(time.time() - start, 2),
        }
        self.save_outputs_(tasks, names, coefficients, features, losses, summary)
        self.print_profile_summary()
        return base

    # ------------------------------------------------------------------------------------------------
    def check_outputs(self) -> None:
        """Before any work: the log dir, ``merged_model_save_path`` and the report path of the
        program are writable, and no earlier output would be overwritten (unless ``overwrite``)."""
        program = self._program
        check_output_locations(
            log_dir=self.log_dir if self.save_outputs else None,
            merged_model_save_path=getattr(program, "merged_model_save_path", None),
            report_save_path=getattr(program, "report_save_path", None),
            overwrite=self.overwrite,
            artefacts=(),  # our own outputs go to a fresh directory, never over an earlier one
        )

    @torch.no_grad()
    def validate_task_models(self, tasks: List[str], base) -> None:
        """Every task model, before any data is loaded: readable, the parameters and shapes of
        ``_pretrained_``, finite values. Streamed from the checkpoint files one transformer block at a
        time (a model that cannot be streamed is loaded alone and freed), so memory stays at most one
        model wide."""
        reference = {n: tuple(p.shape) for n, p in canonical_parameters(base).items()}
        buffers = list(canonical_buffers(base))
        groups = weight_groups(reference)
        for task in tasks:
            reader = open_reader(self.modelpool, task, buffers)
            check_model_weights(PRETRAINED, reference, task, reader, groups)
            del reader

    def load_images(self, modelpool, tasks: List[str], guard: TestSplitGuard):
        """Each task's unlabelled held-out images (batches go to the device when used) and what was
        read (split, paths, fingerprint, rows): ``num_unlabelled_per_task`` images as one host
        tensor, or, with ``null``, the whole split as :class:`StreamedImages` (processed a batch
        at a time when used)."""
        needed = self.batch_size_per_task + (1 if self.selection != "none" else 0)
        images, data_read = {}, {}
        for t in tasks:
            unlabelled = held_out_images(
                modelpool,
                t,
                self.clip_processor,
                self.num_unlabelled_per_task,
                self.seed,
                self.data_source,
                guard=guard,
            )
            data_read[t] = unlabelled.source
            if len(unlabelled) < needed:
                raise ValueError(
                    f"task {t!r}: {len(unlabelled)} unlabelled images, fewer than "
                    f"batch_size_per_task={self.batch_size_per_task}"
                    + (
                        " plus one held out for `selection`"
                        if needed > self.batch_size_per_task
                        else ""
                    )
                )
            # a configured number is stacked once; the whole split (null) is streamed, a batch at
            # a time, never held
            images[t] = (
                StreamedImages(unlabelled)
                if self.num_unlabelled_per_task is None
                else stack_images(unlabelled)
            )
        return images, data_read

    def split_for_selection(self, tasks, images, teacher, data_read):
        """``((train images, train teacher logits), held-out (images, logits) or None)``: with
        ``selection``, a seeded ``selection_fraction`` of each task's images is held out for model
        selection and never trained on."""
        if self.selection == "none":
            for t in tasks:
                data_read[t]["num_training_images"] = len(images[t])
            return (images, teacher), None
        train_images, train_teacher, held_images, held_teacher = {}, {}, {}, {}
        generator = torch.Generator().manual_seed(self.seed)
        for t in tasks:
            n = len(images[t])
            n_held = min(n - self.batch_size_per_task, max(1, round(self.selection_fraction * n)))
            order = torch.randperm(n, generator=generator)
            held, kept = order[:n_held], order[n_held:]
            train_images[t], held_images[t] = select(images[t], kept), select(images[t], held)
            train_teacher[t] = teacher[t][kept.to(teacher[t].device)]
            held_teacher[t] = teacher[t][held.to(teacher[t].device)]
            data_read[t] |= {"num_training_images": len(kept), "num_selection_images": n_held}
        return (train_images, train_teacher), (held_images, held_teacher)

    @torch.no_grad()
    def load_task_models(self, tasks: List[str], base_state, images):
        """Load each task model once: check it, take its task vector and statistics, label its images.

        The merged tensors are the keys of ``base_state``, in order. Returns ``task_vectors``
        (name -> ``[K, *shape]``), per-task statistics ``[K, L, 3 + r]`` and the teacher logits of
        each task's unlabelled images (on the compute device).
        """
        names = list(base_state)
        K, L = len(tasks), len(names)
        task_vectors: Dict[str, torch.Tensor] = {
            n: base_state[n].new_empty((K, *base_state[n].shape)) for n in names
        }
        features = torch.zeros(K, L, 3 + self.svd_rank)
        teacher: Dict[str, torch.Tensor] = {}
        for k, task in enumerate(
            tqdm(tasks, "StatsMerging: task models", disable=not self.fabric.is_global_zero)
        ):
            with self.profile("load task models"):
                model = load_pool_model(self.modelpool, task)  # validated before data loading
                state = trainable_state(model)
                check_compatible(PRETRAINED, base_state, task, state)
                model = self.to_device(model).eval()
            with self.profile("teacher labels"):
                teacher[task] = torch.cat(
                    [
                        self.compute_logits(model, self.to_device(chunk), task)
                        for chunk in images[task].split(self.teacher_batch_size)
                    ]
                )
            with self.profile("task vectors and statistics"):
                for l, name in enumerate(names):
                    finetuned = model.get_parameter(name).detach()
                    task_vectors[name][k] = finetuned - base_state[name]
                    source = (
                        task_vectors[name][k] if self.stats_source == "task_vector" else finetuned
                    )
                    features[k, l] = tensor_statistics(
                        source,
                        self.svd_rank,
                        name=f"{task}:{name}",
                        exact_max_numel=self.svd_exact_max_numel,
                    ).cpu()
            del model, state
            release_free_memory()  # the model's heap memory, before the next one loads
        return task_vectors, features, teacher

    def learner_features(
        self, task_vectors, features: torch.Tensor, names: List[str]
    ) -> torch.Tensor:
        """The learner's input for the chosen granularity, learner mode, statistics and
        normalisation (fitted over every task and tensor, applied to the rows the learner gets)."""
        if self.learner == "per_tensor":
            with self.profile("pooled statistics"):
                per_tensor, whole = pooled_model_statistics([task_vectors[n] for n in names], names)
            columns = feature_columns(self.stat_features, 0, pooled=True)
            reference = per_tensor[:, columns]
            rows = reference if self.granularity == "layer_wise" else whole[columns][None]
        else:
            reference = features[..., feature_columns(self.stat_features, self.svd_rank)]
            rows = reference if self.granularity == "layer_wise" else pool_task_wise(reference)
        return FeatureNormalizer(reference, self.feature_norm)(rows)

    def build_learner(self, num_tasks: int, learner_features: torch.Tensor) -> StatsMergeLearner:
        num_tensors = learner_features.shape[-2] if learner_features.dim() >= 2 else 1
        return StatsMergeLearner(
            num_tasks=num_tasks,
            num_tensors=num_tensors,
            in_features=learner_features.shape[-1],
            mode=self.learner,
            hidden_dim=self.hidden_dim,
            output_norm=self.output_norm,
            out_bias=(  # the official task-wise bias, unless the learner starts at zero logits
                0.3
                if self.learner == "per_tensor"
                and self.granularity == "task_wise"
                and not self.zero_init_output
                else 0.0
            ),
            scale=self.scale,
            init_scale=self.init_scale,
            zero_init_output=self.zero_init_output,
        )

    def train_learner(
        self, tasks, target: TaskVectorMerge, learner_features, images, teacher, held
    ):
        """Adam on the combined per-task distillation losses (spec §3, steps E-F), with optional
        model selection on the ``held`` (images, teacher logits). Returns the coefficients, the loss
        of every step and what the summary reports (optimiser, objective at start and end,
        coefficient movement, selection)."""
        torch.manual_seed(self.seed)  # the learner's initialisation is identical on every rank
        learner = self.build_learner(len(tasks), learner_features)
        steps = 1 if self.is_debug_mode else self.max_steps
        settings = self.optimiser_settings()
        optimizer, scheduler = build_optimiser(learner, settings, steps)
        learner, optimizer = self.fabric.setup(learner, optimizer)
        self._activation_bytes_per_image = None  # measured by the first backward pass
        learner_features = self.to_device(learner_features)
        with torch.no_grad():
            start_coefficients = learner(learner_features).detach().float()
        with self.profile("objective at the start"):
            start_losses = self.evaluate_merge(target, start_coefficients, images, teacher)["loss"]
        start = {t: max(v, MIN_START_LOSS) for t, v in start_losses.items()}
        selector = (
            None if self.selection == "none" else ModelSelector(self.selection, self.patience)
        )
        if selector is not None:
            self.select(selector, 0, target, start_coefficients, held, start, learner)
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.fabric.global_rank)
        losses: List[float] = []
        bar = tqdm(
            range(steps),
            ("[DEBUG MODE] " if self.is_debug_mode else "") + f"StatsMerging ({self.granularity})",
            disable=not self.fabric.is_global_zero,
        )
        for step in bar:
            with self.profile("train step"):
                batches = {
                    t: torch.randperm(len(images[t]), generator=generator)[
                        : self.batch_size_per_task
                    ]
                    for t in tasks
                }
                optimizer.zero_grad(set_to_none=True)
                loss = self.distillation_backward(
                    learner, learner_features, target, images, teacher, batches, start=start
                )
                # after backward: under DDP the gradients are all-reduced, so every rank stops at
                # the same step (one rank's loss, or every rank's gradients)
                check_finite_loss("StatsMerging", float(loss.detach()), step + 1, steps)
                check_finite_gradients("StatsMerging", learner.parameters(), step + 1)
                optimizer.step()
                scheduler.step()
                release_free_memory(collect=False)  # the learner backward's and Adam's temporaries
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
            if selector is not None and ((step + 1) % self.eval_every == 0 or step + 1 == steps):
                with torch.no_grad():
                    current = learner(learner_features).detach().float()
                if self.select(selector, step + 1, target, current, held, start, learner):
                    break
        if selector is not None:
            coefficients, scale = selector.best_coefficients, selector.best_info["overall_scale"]
        else:
            with torch.no_grad():
                coefficients = learner(learner_features).detach().float()
            scale = round(float(learner.overall_scale().detach()), 6)
        self.rank_max_abs_diff = self.check_ranks_agree(coefficients)
        with self.profile("objective at the end"):
            end_losses = self.evaluate_merge(target, coefficients, images, teacher)["loss"]
        report = {
            "optimiser": {
                "lr": settings.lr,
                "lr_schedule": settings.schedule,
                "lr_step_size": settings.step_size,
                "lr_gamma": settings.gamma,
                **({"scale_lr": settings.scale_lr} if self.scale == "learned" else {}),
            },
            "overall_scale": scale,
            "coefficient_movement": coefficient_movement(coefficients, start_coefficients),
            "training_loss_per_task": {
                "start": {t: round(v, 6) for t, v in start_losses.items()},
                "end": {t: round(v, 6) for t, v in end_losses.items()},
            },
            "selection": (
                None
                if selector is None
                else {
                    "mode": self.selection,
                    "metric": self.selection_metric,
                    "selected_step": selector.best_step,
                    "selected_metric": round(selector.best_metric, 6),
                    "history": selector.history,
                }
            ),
        }
        return coefficients, losses, report

    def select(
        self, selector: ModelSelector, step, target, coefficients, held, start, learner
    ) -> bool:
        """Evaluate ``coefficients`` (of ``learner`` now) on the held-out images; ``True`` when
        training should stop (rank 0 decides under DDP)."""
        with self.profile("model selection"):
            result = self.evaluate_merge(target, coefficients, *held)
        if self.selection_metric == "agreement":
            metric = sum(result["agreement"].values()) / len(result["agreement"])
        else:
            metric = -float(
                combine_task_losses(
                    {t: torch.tensor(v) for t, v in result["loss"].items()},
                    self.task_weighting,
                    start,
                )
            )
        scale = round(float(learner.overall_scale().detach()), 6)
        stop = selector.update(step, metric, coefficients, overall_scale=scale)
        return bool(self.fabric.broadcast(stop, src=0))

    @torch.no_grad()
    def evaluate_merge(self, target: TaskVectorMerge, coefficients, images, teacher) -> dict:
        """Per task, over all of ``images``: the task's training loss (as weighted by
        ``task_weighting``, before the combination over tasks) and the agreement with its teacher.
        """
        result = {"loss": {}, "agreement": {}}
        with target.merged_model(coefficients, in_place=self.merge_in_place) as merged:
            for t in images:
                logits = torch.cat(
                    [
                        self.compute_logits(merged, self.to_device(chunk), t)
                        for chunk in images[t].split(self.teacher_batch_size)
                    ]
                )
                result["loss"][t] = float(
                    task_loss(self.loss, logits, teacher[t], self.temperature, self.task_weighting)
                )
                result["agreement"][t] = agreement(logits, teacher[t])
        return result

    def distillation_step(
        self,
        learner,
        learner_features,
        target: TaskVectorMerge,
        images,
        teacher,
        batches,
        start: Optional[Dict[str, float]] = None,
        one_forward: bool = True,
    ) -> torch.Tensor:
        """The objective on one batch per task (a graph to the learner): ONE merged forward of all
        tasks' images (``one_forward=False``: one per task, as before), each task's head on its slice.
        """
        merged = target.model(learner(learner_features))
        return self.group_objective(
            merged, list(batches), images, teacher, batches, start, one_forward=one_forward
        )

    def distillation_backward(
        self,
        learner,
        learner_features,
        target: TaskVectorMerge,
        images,
        teacher,
        batches,
        start: Optional[Dict[str, float]] = None,
    ) -> torch.Tensor:
        """The objective of :meth:`distillation_step` and its gradient, accumulated into the
        learner's ``.grad``, with bounded memory.

        The merged model is built once (:class:`~.merge.LeafMerge`: no merge graph, each merged
        tensor's gradient folded into the coefficients' gradient as soon as it exists). The
        objective is a sum over tasks, so tasks are back-propagated in groups: one task at a time,
        or several together while their saved activations stay under
        :data:`ACTIVATION_BUDGET_BYTES` (measured on the first task of the first step), so one
        backward pass holds the activations of at most one group. The coefficients' gradient then
        goes through the learner in one backward (all-reduced under DDP). Returns the objective
        (detached)."""
        coefficients = learner(learner_features)
        total = torch.zeros(())
        tasks = list(batches)
        with LeafMerge(target, coefficients, in_place=self.merge_in_place) as merge:
            merged = merge.model()
            while tasks:
                group = self.backward_group(tasks, batches)
                tasks = tasks[len(group) :]
                measure = getattr(self, "_activation_bytes_per_image", None) is None
                with SavedActivations(exclude=merge.state.values()) as saved:
                    group_start = None if start is None else {t: start[t] for t in group}
                    part = self.group_objective(
                        merged, group, images, teacher, batches, group_start
                    )
                if measure:
                    images_in_group = sum(len(batches[t]) for t in group)
                    self._activation_bytes_per_image = saved.bytes / images_in_group
                part.backward()
                total = total + part.detach().cpu()
                del part
                release_free_memory(collect=False)  # this group's activations, before the next
            gradient = merge.grad
        self.fabric.backward(coefficients, gradient)
        return total

    def backward_group(self, tasks: List[str], batches) -> List[str]:
        """The tasks at the front of ``tasks`` that one backward pass takes: the first, and the
        next ones while the group's activations (per image, as measured) fit
        :data:`ACTIVATION_BUDGET_BYTES`; only the first until that is measured."""
        per_image = getattr(self, "_activation_bytes_per_image", None)
        group = tasks[:1]
        if per_image is None:
            return group
        n = len(batches[group[0]])
        for t in tasks[1:]:
            n += len(batches[t])
            if n * per_image > ACTIVATION_BUDGET_BYTES:
                break
            group.append(t)
        return group

    def group_objective(
        self, merged, group, images, teacher, batches, start, one_forward: bool = True
    ) -> torch.Tensor:
        """The objective of the tasks in ``group`` on their batches: ONE merged forward of their
        images (``one_forward=False``: one per task), each task's head on its slice."""
        batch = {t: self.to_device(take(images[t], batches[t])) for t in group}
        logits = task_logits(
            lambda x: self.image_embeds(merged, x),
            lambda t, embeds: self.compute_logits(None, None, t, image_embeds=embeds),
            batch,
            one_forward=one_forward,
        )
        losses = {
            t: task_loss(
                self.loss,
                logits[t],
                teacher[t][batches[t].to(teacher[t].device)],
                self.temperature,
                self.task_weighting,
            )
            for t in group
        }
        return combine_task_losses(losses, self.task_weighting, start)

    def check_ranks_agree(self, coefficients: torch.Tensor) -> Optional[float]:
        """Max |difference| between ranks' final coefficients (``None`` in a single process)."""
        if self.fabric.world_size == 1:
            return None
        gathered = self.fabric.all_gather(coefficients)
        diff = float((gathered - gathered[0:1]).abs().max())
        if diff > 0:
            log.warning(f"StatsMerging: coefficients differ between ranks by up to {diff:.3e}")
        return diff

    # ------------------------------------------------------------------------------------------------
    def save_outputs_(
        self, tasks, names, coefficients, features, losses, summary
    ) -> Optional[Path]:
        """Coefficients (.pt, .csv), statistics table, loss curve, heatmap and a JSON summary (rank 0)."""
        if not (self.save_outputs and self.fabric.is_global_zero and self.log_dir is not None):
            return None
        from statsmerge_plugin.plotting import coefficient_heatmap, loss_curves

        out = fresh_dir(Path(self.log_dir), "statsmerging")
        columns = names if coefficients.shape[1] == len(names) else ["all_tensors"]
        coef = coefficients.cpu()
        torch.save(
            {
                "coefficients": coef,
                "tasks": tasks,
                "tensor_names": columns,
                "options": self.config_dict(),
            },
            out / "coefficients.pt",
        )
        with open(out / "coefficients.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["task", *columns])
            for k, task in enumerate(tasks):
                w.writerow([task, *[f"{v:.6g}" for v in coef[k].tolist()]])
        with open(out / "statistics.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["task", "tensor", *feature_names(self.svd_rank)])
            for k, task in enumerate(tasks):
                for l, name in enumerate(names):
                    w.writerow([task, name, *[f"{v:.6g}" for v in features[k, l].tolist()]])
        with open(out / "loss.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "loss"])
            w.writerows(enumerate(losses))
        if losses:
            loss_curves(
                {"distillation loss": losses}, out / "loss.png", "StatsMerging training loss"
            )
        coefficient_heatmap(
            coef.numpy(),
            tasks,
            out / "coefficients_heatmap.png",
            f"StatsMerging coefficients ({self.granularity}, learner={self.learner})",
            "parameter tensor index" if len(columns) > 1 else "",
        )
        summary = summary | {"output_dir": str(out)}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info(f"StatsMerging outputs written to {out}")
        return out

    def config_dict(self) -> dict:
        return {key: getattr(self, key) for key in self._config_mapping if hasattr(self, key)}


def plain_list(value):
    """A Hydra ``ListConfig`` (or tuple) as a plain list; anything else unchanged."""
    from omegaconf import ListConfig, OmegaConf

    if isinstance(value, ListConfig):
        return OmegaConf.to_container(value)
    return list(value) if isinstance(value, tuple) else value
