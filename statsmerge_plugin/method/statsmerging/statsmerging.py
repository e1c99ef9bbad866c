R"""
StatsMerging: statistics-guided model merging via task-specific teacher distillation.

Ranjith Merugu, Bryan Bo Cao, Shubham Jain. "StatsMerging: Statistics-Guided Model Merging via
Task-Specific Teacher Distillation", arXiv:2506.04567 (2025).

Merge rule (Algorithm 1, line 19), for every merged parameter tensor l ("layer" = parameter tensor, as in
AdaMerging and FusionBench's ``LayerWiseMergedModel``):

$$ \theta^l = \theta_0^l + \sum_k \lambda_k^l \tau_k^l, \qquad
   \lambda^l = \mathrm{softmax}_k\big(f(S_k^l)\big), \quad
   S_k^l = [\mu, \sigma^2, \|\cdot\|_2, \sigma'_1, \dots, \sigma'_r](\tau_k^l) $$

``f`` is the StatsMergeLearner; only ``f`` is trained. Its loss is task-specific teacher distillation
(§3.3): fine-tuned model k with task k's frozen zero-shot head labels task k's *unlabelled* images and
the merged model is trained to agree (hard pseudo-label cross-entropy, or KL).

Implementation notes, and deliberate deviations from the official code (spec §2, §6):

* Training data are unlabelled images from a split held out of training data (the pool's val split, else a
  seeded slice of train); the official code trains (and selects checkpoints) on *test-split ground truth*.
  Here the test split is never read: :mod:`statsmerge_plugin.data` refuses it and drops labels.
* Only the learner is trained; the official code also trains the classification heads.
* Statistics are per task (the paper's S_k^l); the official code pools them over tasks. That pooled,
  per-tensor-MLP design is available as ``learner=per_tensor``; ``learner=free`` is a free logit table
  under the same loss, the control that isolates what the statistics contribute.
* Adam, lr 1e-3, StepLR(100, 0.1) as in the paper (the official code uses AdamW + cosine); one "epoch" is
  one optimiser step over ``batch_size_per_task`` images of every task, as in the official code.
* No model selection at all (the official code picks the best test accuracy every 50 epochs).

Reliability (issue 12): every option, model and output location is checked before any long work
(task models are streamed block by block from their files: shapes, finite values, readability); the
loss and the gradients must stay finite during training (the error names the step), and the learned
coefficients and merged weights must be finite before anything is saved or evaluated.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional

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
from statsmerge_plugin.method.prodistill.block_io import load_pool_model, open_reader
from statsmerge_plugin.method.prodistill.layers import (
    canonical_buffers,
    canonical_parameters,
    weight_groups,
)
from statsmerge_plugin.method.statsmerging.distillation import (
    DISTILLATION_LOSSES,
    distillation_loss,
)
from statsmerge_plugin.method.statsmerging.learner import (
    LEARNER_MODES,
    OUTPUT_NORMS,
    StatsMergeLearner,
)
from statsmerge_plugin.method.statsmerging.merge import TaskVectorMerge
from statsmerge_plugin.method.statsmerging.statistics import (
    FEATURE_NORMS,
    feature_names,
    normalize_features,
    pool_task_wise,
    pooled_tensor_statistics,
    tensor_statistics,
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


def fresh_dir(parent: Path, name: str) -> Path:
    """``parent/name``, or ``name_1``, ``name_2``... if taken: earlier outputs are never overwritten."""
    path, i = parent / name, 0
    while path.exists():
        i += 1
        path = parent / f"{name}_{i}"
    path.mkdir(parents=True)
    return path


@auto_register_config
class StatsMergingForCLIP(CLIPClassificationMixin, SimpleProfilerMixin, BaseAlgorithm):
    """StatsMerging for CLIP vision models (FusionBench ``CLIPVisionModelPool``).

    Args:
        granularity: ``layer_wise`` (one coefficient per task and parameter tensor) or ``task_wise``
            (one per task).
        learner: ``shared`` (one MLP on per-task statistics, the paper), ``per_tensor`` (one MLP per
            tensor on statistics pooled over tasks, the official code) or ``free`` (a free logit table).
        stats_source: statistics of the ``task_vector`` (theta_k - theta_0) or of the ``finetuned`` weights.
        svd_rank: number r of top singular values in the statistics.
        svd_exact_max_numel: tensors up to this many elements get an exact SVD, larger ones a randomized
            top-r SVD.
        feature_norm: ``none`` (paper), ``standardize`` or ``log_abs``.
        hidden_dim: hidden width of the learner's MLP(s).
        output_norm: ``softmax`` / ``relu`` / ``none`` over tasks.
        loss: ``ce_hard`` (teacher pseudo-labels) or ``kl_soft``.
        temperature: temperature of ``kl_soft``.
        lr, lr_step_size, lr_gamma: Adam learning rate and StepLR schedule (per step).
        max_steps: optimiser steps ("epochs" in the paper); ``fast_dev_run`` runs one.
        batch_size_per_task: unlabelled images of every task per step.
        num_unlabelled_per_task: unlabelled images per task (``null``: the whole held-out split).
        data_source: ``auto`` (val split if the pool has one, else a seeded slice of train), ``val`` or
            ``train``; never ``test``.
        teacher_batch_size: batch size when labelling images with the teachers.
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
        learner: str = "shared",
        stats_source: str = "task_vector",
        svd_rank: int = 3,
        svd_exact_max_numel: int = 4_000_000,
        feature_norm: str = "none",
        hidden_dim: int = 256,
        output_norm: str = "softmax",
        loss: str = "ce_hard",
        temperature: float = 1.0,
        lr: float = 1e-3,
        lr_step_size: int = 100,
        lr_gamma: float = 0.1,
        max_steps: int = 500,
        batch_size_per_task: int = 4,
        num_unlabelled_per_task: Optional[int] = 128,
        data_source: str = "auto",
        teacher_batch_size: int = 64,
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
        check_choice("loss", self.loss, DISTILLATION_LOSSES)
        check_choice("data_source", self.data_source, HELD_OUT_SOURCES)
        check_int("svd_rank", self.svd_rank, minimum=0)
        for option in (
            "svd_exact_max_numel",
            "hidden_dim",
            "lr_step_size",
            "max_steps",
            "batch_size_per_task",
            "teacher_batch_size",
        ):
            check_int(option, getattr(self, option))
        check_int("num_unlabelled_per_task", self.num_unlabelled_per_task, allow_none=True)
        check_int("seed", self.seed, minimum=0)
        for option in ("temperature", "lr", "lr_gamma"):  # finite numbers > 0
            check_positive(option, getattr(self, option))
        check_bool("save_outputs", self.save_outputs)
        check_bool("overwrite", self.overwrite)
        if self.learner == "per_tensor" and self.stats_source != "task_vector":
            raise ValueError(
                "option `stats_source=finetuned` is not available with `learner=per_tensor`: "
                "the official per-tensor features are statistics of the task vectors"
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
            images = {
                t: held_out_images(
                    modelpool,
                    t,
                    self.clip_processor,
                    self.num_unlabelled_per_task,
                    self.seed,
                    self.data_source,
                    guard=guard,
                )
                for t in tasks
            }
            data_read = {t: images[t].source for t in tasks}
            for t in tasks:
                if len(images[t]) < self.batch_size_per_task:
                    raise ValueError(
                        f"task {t!r}: {len(images[t])} unlabelled images, fewer than "
                        f"batch_size_per_task={self.batch_size_per_task}"
                    )
            images = {t: self.to_device(stack_images(images[t])) for t in tasks}

        self.setup_zero_shot_classification_head(task_names=tasks)
        base = self.to_device(base).eval()

        base_state = trainable_state(base)  # on the compute device now
        task_vectors, features, teacher = self.load_task_models(tasks, base_state, images)
        target = TaskVectorMerge(base, base_state, task_vectors)
        learner_features = self.learner_features(task_vectors, features, names)
        coefficients, losses = self.train_learner(tasks, target, learner_features, images, teacher)

        # nothing non-finite is ever saved or evaluated
        columns = names if coefficients.shape[1] == len(names) else ["all tensors"]
        check_finite_coefficients("StatsMerging", coefficients, tasks, columns)
        with torch.no_grad():
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

    @torch.no_grad()
    def load_task_models(self, tasks: List[str], base_state, images):
        """Load each task model once: check it, take its task vector and statistics, label its images.

        The merged tensors are the keys of ``base_state``, in order. Returns ``task_vectors`` (name -> ``[K, *shape]``), per-task statistics ``[K, L, 3 + r]`` and the
        teacher logits of each task's unlabelled images.
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
                        self.compute_logits(model, chunk, task)
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
        return task_vectors, features, teacher

    def learner_features(
        self, task_vectors, features: torch.Tensor, names: List[str]
    ) -> torch.Tensor:
        """The learner's input for the chosen granularity and learner mode."""
        if self.learner == "per_tensor":
            if self.granularity == "layer_wise":
                pooled = torch.stack(
                    [pooled_tensor_statistics(list(task_vectors[n]), name=n) for n in names]
                )
            else:
                K = next(iter(task_vectors.values())).shape[0]
                whole = [
                    torch.cat([task_vectors[n][k].reshape(-1) for n in names]) for k in range(K)
                ]
                pooled = pooled_tensor_statistics(whole, name="<all tensors>").unsqueeze(0)
            return normalize_features(pooled, self.feature_norm)
        if self.granularity == "task_wise":
            features = pool_task_wise(features)
        return normalize_features(features, self.feature_norm)

    def build_learner(self, num_tasks: int, learner_features: torch.Tensor) -> StatsMergeLearner:
        num_tensors = learner_features.shape[-2] if learner_features.dim() >= 2 else 1
        return StatsMergeLearner(
            num_tasks=num_tasks,
            num_tensors=num_tensors,
            in_features=learner_features.shape[-1],
            mode=self.learner,
            hidden_dim=self.hidden_dim,
            output_norm=self.output_norm,
            out_bias=(
                0.3 if (self.learner == "per_tensor" and self.granularity == "task_wise") else 0.0
            ),
        )

    def train_learner(self, tasks, target: TaskVectorMerge, learner_features, images, teacher):
        """Adam + StepLR on the summed per-task distillation losses (spec §3, steps E-F)."""
        torch.manual_seed(self.seed)  # the learner's initialisation is identical on every rank
        learner = self.build_learner(len(tasks), learner_features)
        optimizer = torch.optim.Adam(learner.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, self.lr_step_size, self.lr_gamma)
        learner, optimizer = self.fabric.setup(learner, optimizer)
        learner_features = self.to_device(learner_features)
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.fabric.global_rank)
        steps = 1 if self.is_debug_mode else self.max_steps
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
                loss = self.distillation_step(
                    learner, learner_features, target, images, teacher, batches
                )
                optimizer.zero_grad(set_to_none=True)
                self.fabric.backward(loss)
                # after backward: under DDP the gradients are all-reduced, so every rank stops at
                # the same step (one rank's loss, or every rank's gradients)
                check_finite_loss("StatsMerging", float(loss.detach()), step + 1, steps)
                check_finite_gradients("StatsMerging", learner.parameters(), step + 1)
                optimizer.step()
                scheduler.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
        with torch.no_grad():
            coefficients = learner(learner_features).detach().float()
        self.rank_max_abs_diff = self.check_ranks_agree(coefficients)
        return coefficients, losses

    def distillation_step(
        self, learner, learner_features, target: TaskVectorMerge, images, teacher, batches
    ) -> torch.Tensor:
        """One merged forward per task batch; the summed distillation loss (a graph to the learner)."""
        merged = target.model(learner(learner_features))
        loss = 0.0
        for task, idx in batches.items():
            student = self.compute_logits(merged, images[task][idx.to(images[task].device)], task)
            target = teacher[task][idx.to(teacher[task].device)]
            loss = loss + distillation_loss(self.loss, student, target, self.temperature)
        return loss

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
