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

This class only wires FusionBench's pool, data, Fabric and logging, in :meth:`StatsMergingForCLIP.run`
from top to bottom. The math is in :mod:`.statistics`, :mod:`.learner`, :mod:`.distillation` and
:mod:`.merge`; the training loop in :mod:`.training`; the options in :mod:`.options`; what is written
in :mod:`.outputs`; checks in :mod:`statsmerge_plugin.validation`.

Implementation notes, and deliberate deviations from the official code (spec §2, §6):

* Training data are unlabelled images from a split held out of training data (the pool's val split, else a
  seeded slice of train); the official code trains (and selects checkpoints) on *test-split ground truth*.
  Here the test split is never read: :mod:`statsmerge_plugin.data` refuses it and drops labels. Model
  selection (``model_selection.mode``), when asked for, uses a held-out part of those same images and the
  teachers' labels, never the test split and never ground truth.
* Only the learner is trained; the official code also trains the classification heads.
* Statistics are per task (the paper's S_k^l); the official code pools them over tasks. That pooled,
  per-tensor-MLP design is available as ``learner=per_tensor``; ``learner=free`` is a free logit table
  under the same loss, the control that isolates what the statistics contribute. Each mode has its own
  default learning rate (``optim.lr=null``), under which it can reach any coefficient table.
* One merged forward per step: every task's images are concatenated and encoded once, each task's head
  is applied to its slice (the official code runs one forward per task).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Dict, List, Mapping, Optional

import torch
from fusion_bench import BaseAlgorithm, auto_register_config
from fusion_bench.mixins import CLIPClassificationMixin, SimpleProfilerMixin
from fusion_bench.modelpool import CLIPVisionModelPool
from tqdm.auto import tqdm

from statsmerge_plugin.data import TestSplitGuard, resolve_held_out_source
from statsmerge_plugin.memory import release_free_memory
from statsmerge_plugin.method.openclip import OpenCLIPSupportMixin, load_classification_heads
from statsmerge_plugin.model_io import (
    canonical_buffers,
    canonical_parameters,
    load_pool_model,
    open_reader,
    weight_groups,
)
from statsmerge_plugin.precision import is_low_precision, module_dtype, resolve_compute_dtype
from statsmerge_plugin.threads import configure_torch_threads
from statsmerge_plugin.validation import (
    check_bool,
    check_compatible,
    check_finite,
    check_finite_coefficients,
    check_model_weights,
    check_output_locations,
    check_pool_models,
    check_task_classnames,
    trainable_state,
)

from .images import load_unlabelled, split_for_selection
from .learner import StatsMergeLearner
from .merge import TaskVectorMerge
from .options import FLAT_KEYS, GROUPS, StatsMergingOptions, resolve_options
from .outputs import write_outputs
from .statistics import (
    FeatureNormalizer,
    feature_columns,
    pool_task_wise,
    pooled_model_statistics,
    tensor_statistics,
)
from .training import LearnerTraining, TeacherDistillation

log = logging.getLogger(__name__)

PRETRAINED = "_pretrained_"


@auto_register_config
class StatsMergingForCLIP(
    OpenCLIPSupportMixin, CLIPClassificationMixin, SimpleProfilerMixin, BaseAlgorithm
):
    """StatsMerging for CLIP vision models: FusionBench's ``CLIPVisionModelPool`` (Hugging Face CLIP)
    or ``OpenCLIPVisionModelPool`` (open_clip ``ImageEncoder``s with the pool's classification heads,
    e.g. the ``task_vectors`` checkpoints; see :mod:`statsmerge_plugin.method.openclip`).

    The options most runs change:

    Args:
        granularity: ``layer_wise`` (one coefficient per task and parameter tensor) or ``task_wise``.
        learner: ``per_tensor`` (one MLP per tensor on statistics pooled over tasks, the official
            code; default), ``shared`` (one MLP on per-task statistics, the paper's equations) or
            ``free`` (a free logit table: the control).
        max_steps: optimiser steps ("epochs" in the paper); ``fast_dev_run`` runs one.
        batch_size_per_task: unlabelled images of every task per step.
        num_unlabelled_per_task: unlabelled images per task (``None``: the whole held-out split,
            streamed a batch at a time).
        data_source: ``auto`` (the pool's val split if it has one, else a seeded slice of train),
            ``val`` or ``train``; never ``test``.
        seed: seeds data sampling and the learner's initialisation.
        compute_dtype: ``None`` (the pool's dtype), ``float32``, ``bfloat16`` or ``float16``: the
            dtype of the weights, task vectors, merged tensors and activations; the learner, the
            coefficients, their gradients and the zero-shot heads stay float32. The merged model
            is returned in the pool's dtype.
        features, mlp, coefficients, objective, optim, model_selection, memory: the research
            groups, each a mapping of its keys (:mod:`.options`; ``config/method/statsmerging.yaml``
            explains every key).
        save_outputs: write coefficients, statistics, loss curve, heatmap and summary into the log dir.
        overwrite: allow replacing an earlier run's files (an existing, non-empty
            ``merged_model_save_path``, the program's report; under the CLI also the log dir's
            ``config.yaml``, ...). Off by default: such a run stops before any work. This method's own
            outputs are never overwritten (a second run writes ``statsmerging_1/``).
        **kwargs: the old flat option names (``hidden_dim``, ``lr``, ``selection``, ...) still work:
            each is moved to its group key with a warning (:data:`~.options.FLAT_KEYS`).
    """

    #: the dtype of weights, task vectors and activations (resolved from the pool in ``run``)
    _compute_dtype: torch.dtype = torch.float32

    def __init__(
        self,
        granularity: str = "layer_wise",
        learner: str = "per_tensor",
        max_steps: int = 500,
        batch_size_per_task: int = 4,
        num_unlabelled_per_task: Optional[int] = 128,
        data_source: str = "auto",
        seed: int = 0,
        compute_dtype: Optional[str] = None,
        features: Optional[Mapping[str, Any]] = None,
        mlp: Optional[Mapping[str, Any]] = None,
        coefficients: Optional[Mapping[str, Any]] = None,
        objective: Optional[Mapping[str, Any]] = None,
        optim: Optional[Mapping[str, Any]] = None,
        model_selection: Optional[Mapping[str, Any]] = None,
        memory: Optional[Mapping[str, Any]] = None,
        save_outputs: bool = True,
        overwrite: bool = False,
        **kwargs,
    ):
        flat = {key: kwargs.pop(key) for key in list(kwargs) if key in FLAT_KEYS}
        super().__init__(**kwargs)
        self.options: StatsMergingOptions = resolve_options(
            {
                "granularity": granularity,
                "learner": learner,
                "max_steps": max_steps,
                "batch_size_per_task": batch_size_per_task,
                "num_unlabelled_per_task": num_unlabelled_per_task,
                "data_source": data_source,
                "seed": seed,
                "compute_dtype": compute_dtype,
            },
            {name: getattr(self, name) for name in GROUPS},
            flat,
        )
        check_bool("save_outputs", save_outputs)
        check_bool("overwrite", overwrite)

    # ------------------------------------------------------------------------------------------------
    def run(self, modelpool: CLIPVisionModelPool):
        o = self.options
        self.modelpool = modelpool
        configure_torch_threads()
        torch.manual_seed(o.seed)
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
            resolve_held_out_source(modelpool, t, o.data_source, guard)
        self.check_outputs()
        with self.profile("load pretrained model"):
            base = load_pool_model(modelpool, PRETRAINED)
            pool_dtype = module_dtype(base)
            self._compute_dtype = resolve_compute_dtype(o.compute_dtype, pool_dtype)
            base.requires_grad_(False).to(self._compute_dtype)
            base_state = trainable_state(base)
            check_finite(PRETRAINED, base_state)
            names = list(base_state)
        with self.profile("validate task models"):
            self.validate_task_models(tasks, base)
        if o.memory.merge_in_place and is_low_precision(self._compute_dtype):
            log.warning(
                f"StatsMerging: memory.merge_in_place is off for {self._compute_dtype} compute (an "
                "in-place merge undone in half precision does not give theta_0 back exactly); each "
                "step's merged tensors are built beside theta_0"
            )
            o = self.options = dataclasses.replace(
                o, memory=dataclasses.replace(o.memory, merge_in_place=False)
            )
        # --- unlabelled data, teachers, task vectors and their statistics ------------------------
        with self.profile("load unlabelled data"):
            images, data_read = load_unlabelled(modelpool, tasks, self.clip_processor, o, guard)
        self.setup_zero_shot_classification_head(task_names=tasks)
        base = self.to_device(base).eval()
        base_state = trainable_state(base)  # on the compute device now
        task_vectors, features, teacher = self.load_task_models(tasks, base_state, images)
        train, held = split_for_selection(tasks, images, teacher, data_read, o)
        target = TaskVectorMerge(base, base_state, task_vectors)
        learner_features = self.learner_features(task_vectors, features, names)
        release_free_memory()  # what loading and the statistics freed, before training
        # --- train the learner (label-free teacher distillation) ----------------------------------
        torch.manual_seed(o.seed)  # the learner's initialisation is identical on every rank
        learner = self.build_learner(len(tasks), learner_features)
        training = self.learner_training()
        coefficients, losses, report = training.run(
            tasks, target, learner, learner_features, train, held
        )
        release_free_memory()  # the training steps' activations, before the final merge
        # --- the final merge: nothing non-finite is ever saved or evaluated -----------------------
        columns = names if coefficients.shape[1] == len(names) else ["all tensors"]
        check_finite_coefficients("StatsMerging", coefficients, tasks, columns)
        with torch.no_grad():
            if (
                o.memory.merge_in_place
            ):  # theta_0 as loaded (without the in-place merges' rounding),
                with self.profile("reload pretrained model"):  # then merged in its own storage
                    theta_0 = load_pool_model(modelpool, PRETRAINED).to(self._compute_dtype)
                    base.load_state_dict(theta_0.state_dict())
                    del theta_0
                check_finite("merged model", target.merge_(coefficients))
            else:
                merged_state = target.state(coefficients)
                check_finite("merged model", merged_state)
                base.load_state_dict(merged_state, strict=False)
        base.to(pool_dtype)  # the merged model in the pool's dtype (a no-op by default)
        summary = {
            "method": "statsmerging",
            "dtypes": {"pool": str(pool_dtype), "compute": str(self._compute_dtype)},
            "granularity": o.granularity,
            "learner": o.learner,
            "tasks": tasks,
            "num_tensors": len(names),
            "steps": len(losses),
            "final_loss": losses[-1] if losses else None,
            **report,
            "world_size": self.fabric.world_size,
            "rank_max_abs_diff": training.rank_max_abs_diff,
            "unlabelled_data": data_read,
            "wall_time_s": round(time.time() - start, 2),
        }
        if self.save_outputs and self.fabric.is_global_zero and self.log_dir is not None:
            write_outputs(
                self.log_dir,
                tasks,
                names,
                coefficients,
                features,
                losses,
                summary,
                options=o.as_dict(),
                title=f"StatsMerging coefficients ({o.granularity}, learner={o.learner})",
            )
        self.print_profile_summary()
        return base

    # ------------------------------------------------------------------------------------------------
    def teacher_distillation(self) -> TeacherDistillation:
        """The objective: this run's teachers' labels, its zero-shot heads and loss options."""
        return TeacherDistillation(
            logits=self.compute_logits,
            embeds=self.image_embeds,
            head=lambda t, embeds: self.compute_logits(None, None, t, image_embeds=embeds),
            to_device=self.to_device,
            options=self.options.objective,
            batch_size=self.options.memory.teacher_batch_size,
        )

    def learner_training(self) -> LearnerTraining:
        """The training loop of this run (Fabric, options, objective, profiler)."""
        return LearnerTraining(
            self.fabric, self.options, self.teacher_distillation(), self.profile, self.is_debug_mode
        )

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

        The merged tensors are the keys of ``base_state``, in order. Returns ``task_vectors``
        (name -> ``[K, *shape]``), per-task statistics ``[K, L, 3 + r]`` and the teacher logits of
        each task's unlabelled images (on the compute device).
        """
        f = self.options.features
        names = list(base_state)
        K, L = len(tasks), len(names)
        task_vectors: Dict[str, torch.Tensor] = {
            n: base_state[n].new_empty((K, *base_state[n].shape)) for n in names
        }
        features = torch.zeros(K, L, 3 + f.svd_rank)
        teacher: Dict[str, torch.Tensor] = {}
        batch_size = self.options.memory.teacher_batch_size
        for k, task in enumerate(
            tqdm(tasks, "StatsMerging: task models", disable=not self.fabric.is_global_zero)
        ):
            with self.profile("load task models"):
                model = load_pool_model(self.modelpool, task)  # validated before data loading
                model.to(self._compute_dtype)
                state = trainable_state(model)
                check_compatible(PRETRAINED, base_state, task, state)
                model = self.to_device(model).eval()
            with self.profile("teacher labels"):
                teacher[task] = torch.cat(
                    [
                        self.compute_logits(model, self.to_device(chunk), task)
                        for chunk in images[task].split(batch_size)
                    ]
                )
            with self.profile("task vectors and statistics"):
                for l, name in enumerate(names):
                    finetuned = model.get_parameter(name).detach()
                    task_vectors[name][k] = finetuned - base_state[name]
                    source = task_vectors[name][k] if f.stats_source == "task_vector" else finetuned
                    features[k, l] = tensor_statistics(
                        source,
                        f.svd_rank,
                        name=f"{task}:{name}",
                        exact_max_numel=f.svd_exact_max_numel,
                    ).cpu()
            del model, state
            release_free_memory()  # the model's heap memory, before the next one loads
        return task_vectors, features, teacher

    def learner_features(
        self, task_vectors, features: torch.Tensor, names: List[str]
    ) -> torch.Tensor:
        """The learner's input for the chosen granularity, learner mode, statistics and
        normalisation (fitted over every task and tensor, applied to the rows the learner gets)."""
        o, f = self.options, self.options.features
        if o.learner == "per_tensor":
            with self.profile("pooled statistics"):
                per_tensor, whole = pooled_model_statistics([task_vectors[n] for n in names], names)
            columns = feature_columns(f.stat_features, 0, pooled=True)
            reference = per_tensor[:, columns]
            rows = reference if o.granularity == "layer_wise" else whole[columns][None]
        else:
            reference = features[..., feature_columns(f.stat_features, f.svd_rank)]
            rows = reference if o.granularity == "layer_wise" else pool_task_wise(reference)
        return FeatureNormalizer(reference, f.feature_norm)(rows)

    def build_learner(self, num_tasks: int, learner_features: torch.Tensor) -> StatsMergeLearner:
        o, c = self.options, self.options.coefficients
        num_tensors = learner_features.shape[-2] if learner_features.dim() >= 2 else 1
        return StatsMergeLearner(
            num_tasks=num_tasks,
            num_tensors=num_tensors,
            in_features=learner_features.shape[-1],
            mode=o.learner,
            hidden_dim=o.mlp.hidden_dim,
            output_norm=c.output_norm,
            out_bias=(  # the official task-wise bias, unless the learner starts at zero logits
                0.3
                if o.learner == "per_tensor"
                and o.granularity == "task_wise"
                and not o.mlp.zero_init_output
                else 0.0
            ),
            scale=c.scale,
            init_scale=c.init_scale,
            zero_init_output=o.mlp.zero_init_output,
        )
