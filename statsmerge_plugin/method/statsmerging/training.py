"""Training the StatsMergeLearner: Adam steps, backward groups, gradient folding and model selection.

Algorithm 1, lines 8-17 of Merugu, Cao, Jain (2025) (spec §3, steps E-F): at every step the learner
predicts the coefficients, the merged model theta_0 + sum_k lambda_k tau_k classifies a batch of each
task's unlabelled images, and the combined distillation loss against the teachers' labels is
back-propagated to the learner only.

Plain inputs, no model pool: a merge target (:class:`~.merge.TaskVectorMerge`), a learner and its
input rows, each task's images and teacher logits, and a :class:`TeacherDistillation` (how the merged
model's logits are computed, and the loss). :class:`LearnerTraining` runs the loop under a Lightning
Fabric (``fabric.backward`` all-reduces the learner's gradient under DDP).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from tqdm.auto import tqdm

from statsmerge_plugin.memory import release_free_memory
from statsmerge_plugin.validation import check_finite_gradients, check_finite_loss

from .distillation import agreement, combine_task_losses, task_logits, task_loss
from .images import take
from .learner import ModelSelector, StatsMergeLearner, build_optimiser, coefficient_movement
from .merge import LeafMerge, SavedActivations, TaskVectorMerge
from .options import ObjectiveOptions, StatsMergingOptions

log = logging.getLogger(__name__)

#: the smallest start loss ``objective.task_weighting=relative`` divides by
MIN_START_LOSS = 1e-6
#: activations one backward pass of a training step may hold: tasks are back-propagated together
#: while their saved activations fit, else one at a time (a ViT-B/32 image at 224 px saves ~37 MB)
ACTIVATION_BUDGET_BYTES = 256 * 2**20
#: on a CUDA device the budget is this fraction of the device's free memory when training starts
#: (after the weights, task vectors and teachers' logits are there): the host rule above would
#: split a 32-image ViT-B/32 step into about six sequential passes on a GPU that holds all of it
CUDA_BUDGET_FRACTION = 0.5


def activation_budget(device, free_bytes: Optional[int] = None) -> int:
    """Bytes of saved activations one backward pass may hold on ``device``:
    :data:`ACTIVATION_BUDGET_BYTES` on the host; on CUDA :data:`CUDA_BUDGET_FRACTION` of
    ``free_bytes`` (default: ``torch.cuda.mem_get_info``'s free memory of ``device``)."""
    device = torch.device(device)
    if device.type != "cuda":
        return ACTIVATION_BUDGET_BYTES
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    return int(CUDA_BUDGET_FRACTION * free_bytes)


@dataclass
class TeacherDistillation:
    """The objective's model side: a task's logits from a model and images (``logits``), or from
    image embeddings (``embeds`` then ``head``, so all tasks' images share ONE merged forward), where
    tensors go (``to_device``), and the distillation loss (``options``)."""

    logits: Callable[[torch.nn.Module, torch.Tensor, str], torch.Tensor]
    embeds: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    head: Callable[[str, torch.Tensor], torch.Tensor]
    to_device: Callable[[torch.Tensor], torch.Tensor]
    options: ObjectiveOptions
    batch_size: int = 64

    def loss(self, logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        o = self.options
        return task_loss(o.loss, logits, teacher, o.temperature, o.task_weighting)

    def combine(self, losses: Dict[str, torch.Tensor], start) -> torch.Tensor:
        return combine_task_losses(losses, self.options.task_weighting, start)

    def group_objective(
        self, merged, group, images, teacher, batches, start, one_forward: bool = True
    ) -> torch.Tensor:
        """The objective of the tasks in ``group`` on their batches: ONE merged forward of their
        images (``one_forward=False``: one per task), each task's head on its slice."""
        batch = {t: self.to_device(take(images[t], batches[t])) for t in group}
        logits = task_logits(
            lambda x: self.embeds(merged, x), self.head, batch, one_forward=one_forward
        )
        losses = {
            t: self.loss(logits[t], teacher[t][batches[t].to(teacher[t].device)]) for t in group
        }
        return self.combine(losses, start)

    @torch.no_grad()
    def evaluate(self, merged, images, teacher) -> dict:
        """Per task, over all of ``images``: the task's loss (before the combination over tasks)
        and the agreement with its teacher."""
        result = {"loss": {}, "agreement": {}}
        for t in images:
            logits = torch.cat(
                [
                    self.logits(merged, self.to_device(chunk), t)
                    for chunk in images[t].split(self.batch_size)
                ]
            )
            result["loss"][t] = float(self.loss(logits, teacher[t]))
            result["agreement"][t] = agreement(logits, teacher[t])
        return result


def distillation_step(
    learner,
    features,
    target: TaskVectorMerge,
    objective: TeacherDistillation,
    images,
    teacher,
    batches,
    start: Optional[Dict[str, float]] = None,
    one_forward: bool = True,
) -> torch.Tensor:
    """The objective on one batch per task with a graph to the learner, through a functional merged
    model (what :meth:`LearnerTraining.backward` computes with bounded memory)."""
    merged = target.model(learner(features))
    return objective.group_objective(
        merged, list(batches), images, teacher, batches, start, one_forward=one_forward
    )


class LearnerTraining:
    """The training loop: ``run`` trains ``learner`` on ``target`` and returns the coefficients.

    Args:
        fabric: FusionBench's Lightning Fabric (device, ranks, ``backward``, ``broadcast``).
        options: the run's options (steps, batch size, optimiser, selection, memory).
        objective: the :class:`TeacherDistillation` of the run.
        profile: a context-manager factory naming a profiled phase (FusionBench's
            ``SimpleProfilerMixin.profile``); none by default.
        debug: one step (FusionBench's ``fast_dev_run``).
    """

    def __init__(
        self,
        fabric,
        options: StatsMergingOptions,
        objective: TeacherDistillation,
        profile: Optional[Callable[[str], contextlib.AbstractContextManager]] = None,
        debug: bool = False,
    ):
        self.fabric, self.options, self.objective, self.debug = fabric, options, objective, debug
        self.profile = profile or (lambda name: contextlib.nullcontext())
        #: activation bytes per image of one backward pass, measured on the first group
        self.activation_bytes_per_image: Optional[float] = None
        #: see :func:`activation_budget` (set for the fabric's device in :meth:`run`)
        self.activation_budget = ACTIVATION_BUDGET_BYTES
        #: ``malloc_trim`` after each pass only when the passes run on the host
        self.on_host = True
        self.rank_max_abs_diff: Optional[float] = None

    @property
    def in_place(self) -> bool:
        return self.options.memory.merge_in_place

    def run(self, tasks, target: TaskVectorMerge, learner: StatsMergeLearner, features, data, held):
        """Adam on the combined per-task distillation losses, with optional model selection on
        ``held`` (images, teacher logits). ``data`` is (images, teacher logits). Returns the
        coefficients, the loss of every step and what the summary reports (optimiser, objective at
        start and end, coefficient movement, selection)."""
        o = self.options
        images, teacher = data
        steps = 1 if self.debug else o.max_steps
        settings = o.optimiser_settings()
        optimizer, scheduler = build_optimiser(learner, settings, steps)
        learner, optimizer = self.fabric.setup(learner, optimizer)
        self.activation_bytes_per_image = None
        self.activation_budget = activation_budget(self.fabric.device)
        self.on_host = torch.device(self.fabric.device).type == "cpu"
        features = self.objective.to_device(features)
        with torch.no_grad():
            start_coefficients = learner(features).detach().float()
        with self.profile("objective at the start"):
            start_losses = self.evaluate(target, start_coefficients, images, teacher)["loss"]
        start = {t: max(v, MIN_START_LOSS) for t, v in start_losses.items()}
        s = o.model_selection
        selector = None if s.mode == "none" else ModelSelector(s.mode, s.patience)
        if selector is not None:
            self.select(selector, 0, target, start_coefficients, held, start, learner)
        generator = torch.Generator().manual_seed(o.seed * 1000 + self.fabric.global_rank)
        losses: List[float] = []
        bar = tqdm(
            range(steps),
            ("[DEBUG MODE] " if self.debug else "") + f"StatsMerging ({o.granularity})",
            disable=not self.fabric.is_global_zero,
        )
        for step in bar:
            with self.profile("train step"):
                batches = {
                    t: torch.randperm(len(images[t]), generator=generator)[: o.batch_size_per_task]
                    for t in tasks
                }
                optimizer.zero_grad(set_to_none=True)
                loss = self.backward(learner, features, target, images, teacher, batches, start)
                # after backward: under DDP the gradients are all-reduced, so every rank stops at
                # the same step (one rank's loss, or every rank's gradients)
                check_finite_loss("StatsMerging", float(loss.detach()), step + 1, steps)
                check_finite_gradients("StatsMerging", learner.parameters(), step + 1)
                optimizer.step()
                scheduler.step()
                if self.on_host:  # the learner backward's and Adam's temporaries
                    release_free_memory(collect=False)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
            if selector is not None and ((step + 1) % s.eval_every == 0 or step + 1 == steps):
                with torch.no_grad():
                    current = learner(features).detach().float()
                if self.select(selector, step + 1, target, current, held, start, learner):
                    break
        if selector is not None:
            coefficients, scale = selector.best_coefficients, selector.best_info["overall_scale"]
        else:
            with torch.no_grad():
                coefficients = learner(features).detach().float()
            scale = round(float(learner.overall_scale().detach()), 6)
        self.rank_max_abs_diff = self.check_ranks_agree(coefficients)
        with self.profile("objective at the end"):
            end_losses = self.evaluate(target, coefficients, images, teacher)["loss"]
        report = {
            "optimiser": {
                "lr": settings.lr,
                "lr_schedule": settings.schedule,
                "lr_step_size": settings.step_size,
                "lr_gamma": settings.gamma,
                **({"scale_lr": settings.scale_lr} if o.coefficients.scale == "learned" else {}),
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
                    "mode": s.mode,
                    "metric": s.metric,
                    "selected_step": selector.best_step,
                    "selected_metric": round(selector.best_metric, 6),
                    "history": selector.history,
                }
            ),
        }
        return coefficients, losses, report

    def select(self, selector: ModelSelector, step, target, coefficients, held, start, learner):
        """Evaluate ``coefficients`` (of ``learner`` now) on the held-out images; ``True`` when
        training should stop (rank 0 decides under DDP)."""
        with self.profile("model selection"):
            result = self.evaluate(target, coefficients, *held)
        if self.options.model_selection.metric == "agreement":
            metric = sum(result["agreement"].values()) / len(result["agreement"])
        else:
            losses = {t: torch.tensor(v) for t, v in result["loss"].items()}
            metric = -float(self.objective.combine(losses, start))
        scale = round(float(learner.overall_scale().detach()), 6)
        stop = selector.update(step, metric, coefficients, overall_scale=scale)
        return bool(self.fabric.broadcast(stop, src=0))

    @torch.no_grad()
    def evaluate(self, target: TaskVectorMerge, coefficients, images, teacher) -> dict:
        """:meth:`TeacherDistillation.evaluate` of the merge with ``coefficients``."""
        with target.merged_model(coefficients, in_place=self.in_place) as merged:
            return self.objective.evaluate(merged, images, teacher)

    def backward(self, learner, features, target, images, teacher, batches, start=None):
        """The objective of :func:`distillation_step` and its gradient, accumulated into the
        learner's ``.grad``, with bounded memory.

        The merged model is built once (:class:`~.merge.LeafMerge`: no merge graph, each merged
        tensor's gradient folded into the coefficients' gradient as soon as it exists). The
        objective is a sum over tasks, so tasks are back-propagated in groups: one task at a time,
        or several together while their saved activations stay under the activation budget
        (:func:`activation_budget`; measured on the first task of the first step), so one
        backward pass holds the activations of at most one group. The coefficients' gradient then
        goes through the learner in one backward (all-reduced under DDP). Returns the objective
        (detached)."""
        coefficients = learner(features)
        total = torch.zeros(())
        tasks = list(batches)
        with LeafMerge(target, coefficients, in_place=self.in_place) as merge:
            merged = merge.model()
            while tasks:
                group = self.backward_group(tasks, batches)
                tasks = tasks[len(group) :]
                measure = self.activation_bytes_per_image is None
                with SavedActivations(exclude=merge.state.values()) as saved:
                    group_start = None if start is None else {t: start[t] for t in group}
                    part = self.objective.group_objective(
                        merged, group, images, teacher, batches, group_start
                    )
                if measure:
                    images_in_group = sum(len(batches[t]) for t in group)
                    self.activation_bytes_per_image = saved.bytes / images_in_group
                part.backward()
                total = total + part.detach().cpu()
                del part
                if self.on_host:  # this group's activations, before the next
                    release_free_memory(collect=False)
            gradient = merge.grad
        self.fabric.backward(coefficients, gradient)
        return total

    def backward_group(self, tasks: List[str], batches) -> List[str]:
        """The tasks at the front of ``tasks`` that one backward pass takes: the first, and the
        next ones while the group's activations (per image, as measured) fit the activation budget
        (:func:`activation_budget`); only the first until that is measured."""
        per_image = self.activation_bytes_per_image
        group = tasks[:1]
        if per_image is None:
            return group
        n = len(batches[group[0]])
        for t in tasks[1:]:
            n += len(batches[t])
            if n * per_image > self.activation_budget:
                break
            group.append(t)
        return group

    def check_ranks_agree(self, coefficients: torch.Tensor) -> Optional[float]:
        """Max |difference| between ranks' final coefficients (``None`` in a single process)."""
        if self.fabric.world_size == 1:
            return None
        gathered = self.fabric.all_gather(coefficients)
        diff = float((gathered - gathered[0:1]).abs().max())
        if diff > 0:
            log.warning(f"StatsMerging: coefficients differ between ranks by up to {diff:.3e}")
        return diff
