R"""
ProDistill: Scalable Model Merging with Progressive Layer-wise Distillation.

Reference:
    Jing Xu, Jiazheng Li, Jingzhao Zhang.
    "Scalable Model Merging with Progressive Layer-wise Distillation."
    ICML 2025. https://arxiv.org/abs/2502.12706
    Official code: github.com/JingXuTHU/Scalable_Model_Merging_with_Progressive_Layerwise_Distillation

The merged model is task arithmetic with element-wise, per-task coefficients inside every transformer
block ``l`` (spec §1.2):

    θ^(l) = θ_0^(l) + Σ_i α_i^(l) ⊙ τ_i^(l),     τ_i = θ_i − θ_0,     α_i^(l) initialised to 0.3.

Blocks are trained one at a time, from input to output, as feature-level multi-teacher distillation on
a few unlabelled images per task (spec §1.4):

    min_α  Σ_x || block_l(θ^(l)(α); z1(x)) − block_l(θ_{t(x)}^(l); z2(x)) ||²

where ``z1`` is the sample's hidden state along the already-distilled merged prefix (student stream)
and ``z2`` its hidden state along its own task's fine-tuned model (teacher stream) — the "dual
inputs". After block ``l`` is trained both streams are pushed through it. Everything outside the
blocks (``embeddings``, ``pre_layrnorm``, ``post_layernorm``) is plain task arithmetic (λ = 0.3).

Choices (following the official vision code where it and the paper differ; spec §5):

- Stage 0 follows the code, not the paper's ``D^(0) = {(x, x)}``: the student stream starts from the
  task-arithmetic model's ``pre_layrnorm(embeddings(x))``, the teacher stream from the task model's
  own embedding stage; embedding-stage parameters are task-arithmetic merged and never trained.
- Loss: the code's plain sum of squared errors over samples, tokens and hidden units
  (``loss_reduction="sum"``; ``"mean"`` is offered).
- Element-wise coefficients for every parameter of a ``CLIPEncoderLayer``, LayerNorms and biases
  included; Adam (lr 0.01), no weight decay, schedule, clamping, normalisation or regulariser.
- Mixed-task shuffled minibatches of 128 over the pooled few-shot set, 100 epochs per block.
- Few-shot images: 64 per task from the pool's ``val`` split (a held-out part of the training data)
  when it has one, else a seeded random slice of the ``train`` split, as the code's
  ``<Task>ValfromTrain``; labels are never read and the test split is never touched.

Deviations (numerically equivalent, cheaper; spec §1.4, §1.6, §5.13):

- Only each sample's own teacher block is run, and only *once per block*: the teacher stream does not
  depend on the coefficients, so its block output is computed before training, used as the target for
  every epoch and kept as the next block's teacher input. The code runs all T teachers on every
  sample in every step and masks.
- Block weights are streamed from each checkpoint (``safetensors.safe_open``) instead of loading
  every full model. Only the current block's pretrained weights, task vectors, coefficients and
  Adam state sit on the compute device, plus the dual-input cache when it fits there
  (``activation_cache=auto``; the code keeps it in host memory and copies every minibatch); else
  the cache stays in pinned host memory (or memory-mapped files) and minibatches are copied
  without blocking. The few-shot images are processed batch by batch, never stacked.
  As in the code, each finished merged block is written to (scratch) disk;
  the output model (the lazily loaded pretrained model) is only filled in after the last block, so
  the loop's peak memory does not grow with depth. The block module that ``functional_call`` runs
  is an empty copy on the ``meta`` device.
- Per block, the report also records the squared feature error per sample over the whole few-shot
  set before training (task-arithmetic coefficients) and after it (``loss_before``/``loss_after``),
  which costs one extra block pass; the code only prints minibatch losses.
- The stage-0 embedding pass uses only the small embedding-stage parameters of each fine-tuned model
  (the code keeps all fine-tuned encoders on the GPU for this step).

OpenCLIP pools (FusionBench's ``OpenCLIPVisionModelPool``, the ``task_vectors`` checkpoints, which
the official code uses): the blocks are ``model.visual.transformer.resblocks[l]`` of the
``ImageEncoder`` (sequence-first in older open_clip versions, handled), the embedding stage is
``conv1``, class token, positional embedding and ``ln_pre``, images go through the encoders'
``val_preprocess``; see :mod:`statsmerge_plugin.method.openclip` and ``docs/prodistill.md``.

The progressive loop itself is :class:`~.engine.ProDistillEngine`, shared with the language-model
variants (:mod:`.language`); this class supplies the images and the output model.

Reliability (issue 12): options, output locations, the few-shot data sources (never a test set, see
:class:`~statsmerge_plugin.data.TestSplitGuard`) and every model are checked before any training;
every step's loss must be finite (the error names the block and the step) and so must every merged
block before it is kept.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from fusion_bench.mixins import auto_register_config
from fusion_bench.modelpool import BaseModelPool
from safetensors.torch import load_file
from torch import nn

from ...data import (
    HELD_OUT_SOURCES,
    TestSplitGuard,
    UnlabelledImages,
    held_out_images,
    resolve_held_out_source,
)
from ...model_io import canonical_buffers, canonical_parameters, load_pool_model, make_reader
from ...threads import configure_torch_threads
from ...validation import check_choice, check_pool_models
from ..openclip import is_openclip_pool, openclip_processor
from .adapters import block_layout
from .engine import OUTPUT_FILES, PRETRAINED, ProDistillEngine  # noqa: F401 - re-exported
from .layers import vision_backbone

log = logging.getLogger(__name__)


@auto_register_config
class ProDistillForCLIP(ProDistillEngine):
    """ProDistill for a ``CLIPVisionModelPool`` or an ``OpenCLIPVisionModelPool`` (spec §1, §6).

    Args:
        data_source: ``"auto"`` (the pool's val split if it has one for the task, else a seeded train
            slice), ``"val"`` or ``"train"``. The test split is never allowed.
        **kwargs: the engine's options (:class:`~.engine.ProDistillEngine`): ``shots_per_task``
            (unlabelled few-shot images per task, spec §1.1: 64), ``seed`` (few-shot draw and
            minibatch shuffling), ``lr`` (0.01), ``epochs_per_block`` (100), ``batch_size`` (128;
            also the chunk size of the embedding and propagation passes), ``init_lambda`` (0.3),
            ``ta_lambda`` (0.3, outside the blocks), ``loss_reduction`` (``sum``/``mean``),
            ``activation_cache`` (``auto``/``device``/``memory``/``disk``), ``scratch_dir``,
            ``allow_single_task``, ``save_loss_curves``, ``overwrite``, ``optimizer_in_backward``;
            every key is explained in ``config/method/prodistill/clip.yaml``.

    Raises:
        ValueError: at construction for an invalid option (the message names the option), and in
            :meth:`run`, before any training, for a bad pool (see :meth:`validate_pool`).
    """

    def __init__(self, data_source: str = "auto", **kwargs):
        super().__init__(**kwargs)

    def check_options(self) -> None:
        super().check_options()
        check_choice("data_source", self.data_source, HELD_OUT_SOURCES)

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        """Merge the pool with ProDistill.

        Args:
            modelpool: a ``CLIPVisionModelPool`` with ``_pretrained_``, the task models, a processor
                and ``val`` or ``train`` datasets for every task; or an ``OpenCLIPVisionModelPool``
                (open_clip ``ImageEncoder`` models, e.g. the ``task_vectors`` checkpoints), whose
                images are processed with the encoders' ``val_preprocess``.

        Returns:
            The merged ``CLIPVisionModel`` (task arithmetic outside the blocks, distilled blocks).
        """
        self.check_options()
        if not isinstance(modelpool, BaseModelPool) or not (
            hasattr(modelpool, "load_processor") or is_openclip_pool(modelpool)
        ):
            raise TypeError(
                "ProDistillForCLIP needs a CLIPVisionModelPool (models, processor and val/train "
                f"datasets) or an OpenCLIPVisionModelPool, got {type(modelpool).__name__}"
            )
        check_pool_models(modelpool, min_models=1 if self.allow_single_task else 2)
        tasks = list(modelpool.model_names)
        configure_torch_threads()
        self._guard = TestSplitGuard(modelpool, getattr(self._program, "taskpool", None))
        for t in tasks:  # config-level test-split check now; the loaded data are checked again
            resolve_held_out_source(modelpool, t, self.data_source, self._guard)
        self.check_outputs()
        device = self.fabric.device
        self.block_records, self.loss_curves = [], type(self.loss_curves)()
        own_scratch = self.scratch_dir is None
        scratch = (  # a temporary directory is this process's own; a given one gets rank subdirs
            Path(tempfile.mkdtemp(prefix="prodistill_"))
            if own_scratch
            else self.rank_scratch(Path(self.scratch_dir))
        )
        t_start = time.perf_counter()
        try:
            return self._run(modelpool, tasks, device, scratch)
        finally:
            if own_scratch:
                shutil.rmtree(scratch, ignore_errors=True)
            log.info(f"ProDistill finished in {time.perf_counter() - t_start:.1f} s")

    def _run(self, modelpool, tasks: List[str], device, scratch: Path) -> nn.Module:
        t0 = time.perf_counter()
        with self.profile("load output skeleton"):
            # one full model: the output. Loaded lazily (memory-mapped) from safetensors; its blocks
            # are only written after the loop. A pool entry that is an nn.Module is copied, so the
            # pool's own model is left unchanged.
            merged_model = load_pool_model(modelpool, PRETRAINED)
            if isinstance(modelpool._models[PRETRAINED], nn.Module):
                merged_model = copy.deepcopy(merged_model)
            backbone = vision_backbone(merged_model)
            self._layout = layout = block_layout(merged_model)
            out_params = canonical_parameters(merged_model)
            self.set_dtypes(out_params)
            reference = {n: tuple(p.shape) for n, p in out_params.items()}
            buffer_names = list(canonical_buffers(merged_model))

        with self.profile("open readers and validate"):
            readers = {
                name: make_reader(modelpool, name, scratch / "converted", buffer_names)
                for name in [PRETRAINED] + tasks
            }
            self._sources = {name: reader.source for name, reader in readers.items()}
            for name, source in self._sources.items():
                log.info(f"model {name!r}: block-wise reads from {source}")
            ref_blocks = self.validate_pool(reference, readers)
            _, other_names = layout.group_names(reference)

        with self.profile("few-shot data"):
            images = self._few_shot_images(modelpool, tasks)

        with self.profile("task arithmetic (non-block)"), torch.no_grad():

            def store(name, value):
                out_params[name].copy_(value.to(out_params[name].dtype))

            student_emb = self.merge_outside_blocks(other_names, readers, tasks, store)

        with self.profile("stage 0: embeddings"):
            first = next(iter(ref_blocks))
            block_numel = sum(
                out_params[layout.block_prefix(first) + n].numel() for n in ref_blocks[first]
            )
            cache = self.stage0(
                backbone, images, student_emb, readers, tasks, device, scratch, block_numel
            )
            self._cache_info = {"placement": cache.placement, "mb": cache.nbytes / 2**20}
        del images, student_emb
        setup_seconds = time.perf_counter() - t0
        log.info(
            f"ProDistill: {len(cache)} samples, {len(ref_blocks)} blocks, cache "
            f"{cache.nbytes / 2**20:.1f} MiB ({cache.placement}), setup {setup_seconds:.1f} s"
        )

        merged_dir = scratch / "merged_blocks"
        self.distill_blocks(
            ref_blocks, layout.blocks(backbone), readers, tasks, cache, device, merged_dir
        )

        with self.profile("assemble output"), torch.no_grad():
            for index in ref_blocks:
                merged = load_file(str(merged_dir / f"block_{index:03d}.safetensors"))
                for n, value in merged.items():
                    p = out_params[n]
                    p.copy_(value.to(p.device, p.dtype))
                del merged
        shutil.rmtree(merged_dir, ignore_errors=True)
        shutil.rmtree(scratch / "converted", ignore_errors=True)

        self.write_outputs(tasks, setup_seconds, time.perf_counter() - t0)
        self.print_profile_summary()
        return merged_model

    def _report_extra(self) -> Dict:
        return {"few_shot_images": dict(self._data_info)}

    def _few_shot_images(self, modelpool, tasks: List[str]) -> List[UnlabelledImages]:
        """The few-shot images of every task (spec §1.1), processed lazily (stage 0 streams them in
        batches); all counts are checked first."""
        processor = (
            openclip_processor(modelpool)
            if is_openclip_pool(modelpool)
            else modelpool.load_processor()
        )
        images = [
            held_out_images(
                modelpool,
                t,
                processor,
                self.shots_per_task,
                seed=self.seed,
                source=self.data_source,
                guard=getattr(self, "_guard", None),
            )
            for t in tasks
        ]  # raises, naming the task, when a split has fewer images than asked or is a test set
        self._data_info = {t: len(im) for t, im in zip(tasks, images)}
        self._data_read = {t: im.source for t, im in zip(tasks, images)}
        return images
