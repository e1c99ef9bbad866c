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

Reliability (issue 12): options, output locations, the few-shot data sources (never a test set, see
:class:`~statsmerge_plugin.data.TestSplitGuard`) and every model are checked before any training;
every step's loss must be finite (the error names the block and the step) and so must every merged
block before it is kept.
"""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from fusion_bench.method.base_algorithm import BaseAlgorithm
from fusion_bench.mixins import LightningFabricMixin, SimpleProfilerMixin, auto_register_config
from fusion_bench.modelpool import BaseModelPool
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ...data import (
    HELD_OUT_SOURCES,
    TestSplitGuard,
    UnlabelledImages,
    held_out_images,
    resolve_held_out_source,
)
from ...threads import configure_torch_threads
from ...validation import (
    check_bool,
    check_choice,
    check_finite,
    check_finite_loss,
    check_finite_number,
    check_int,
    check_model_weights,
    check_output_locations,
    check_pool_models,
    check_positive,
    check_same_groups,
)
from ..openclip import is_openclip_pool, openclip_processor
from .activations import (
    CACHE_PLACEMENTS,
    DualStreamCache,
    block_working_bytes,
    cache_placement,
    stack_task_ids,
)
from .block_io import WeightReader, load_pool_model, make_reader
from .layers import (
    HF_CLIP_LAYOUT,
    BlockLayout,
    block_layout,
    canonical_buffers,
    canonical_parameters,
    empty_block_like,
    vision_backbone,
)
from .merge import LOSS_REDUCTIONS, block_loss, init_coefficients, merge_elementwise
from .merge import task_arithmetic as task_arithmetic_merge
from .reporting import (
    LossCurves,
    cuda_peak_mb,
    current_rss_mb,
    peak_rss_mb,
    reset_cuda_peak,
    write_json,
)

log = logging.getLogger(__name__)

PRETRAINED = "_pretrained_"
#: What a run writes into its log dir; an earlier run's copies are never overwritten silently.
OUTPUT_FILES = ("prodistill_report.json", "prodistill_loss_curves.csv", "prodistill_loss_curves")


@auto_register_config
class ProDistillForCLIP(LightningFabricMixin, SimpleProfilerMixin, BaseAlgorithm):
    """ProDistill for a ``CLIPVisionModelPool`` (spec §1, §6).

    Args:
        shots_per_task: unlabelled few-shot images per task (spec §1.1: 64).
        data_source: ``"auto"`` (the pool's val split if it has one for the task, else a seeded train
            slice), ``"val"`` or ``"train"``. The test split is never allowed.
        seed: seeds the few-shot draw and the minibatch shuffling.
        lr: Adam learning rate for the coefficients (spec §1.1: 0.01).
        epochs_per_block: epochs over the pooled few-shot set per block (spec §1.1: 100).
        batch_size: mixed-task minibatch size (spec §1.1: 128); also the chunk size of the
            embedding and propagation passes.
        init_lambda: initial value of every element-wise coefficient (spec §1.2, §5.5: 0.3).
        ta_lambda: task-arithmetic scaling of the parameters outside the blocks (spec §1.1: 0.3).
        loss_reduction: ``"sum"`` (official code) or ``"mean"`` of the squared feature error.
        activation_cache: where the dual-input cache lives: ``"auto"`` (on the GPU when it fits
            there with a block's working set, else host memory), ``"device"`` (the compute
            device; an error if it does not fit), ``"memory"`` (host RAM; pinned, with
            non-blocking copies, on a GPU) or ``"disk"`` (memory-mapped files in the scratch
            directory).
        scratch_dir: directory for the on-disk cache and for converted checkpoints of pool entries
            that cannot be streamed; a temporary directory (deleted afterwards) when ``None``.
        allow_single_task: accept a pool with a single task model (ProDistill then distils that one
            model; used to check that the merge can reproduce a fine-tuned model). Off by default:
            merging needs at least two task models.
        save_loss_curves: write per-block loss curves (CSV and PNG) into ``log_dir``.
        overwrite: allow replacing an earlier run's outputs (``prodistill_report.json`` and the loss
            curves in ``log_dir``, an existing non-empty ``merged_model_save_path``, the program's
            report; under the CLI also the log dir's ``config.yaml``, ...). Off by default: such a run
            stops before any work.

    Raises:
        ValueError: at construction for an invalid option (the message names the option), and in
            :meth:`run`, before any training, for a bad pool (see :meth:`validate_pool`).
    """

    #: where the blocks and the embedding stage live (set from the pool's models in :meth:`run`)
    _layout: BlockLayout = HF_CLIP_LAYOUT

    def __init__(
        self,
        shots_per_task: int = 64,
        data_source: str = "auto",
        seed: int = 0,
        lr: float = 0.01,
        epochs_per_block: int = 100,
        batch_size: int = 128,
        init_lambda: float = 0.3,
        ta_lambda: float = 0.3,
        loss_reduction: str = "sum",
        activation_cache: str = "auto",
        scratch_dir: Optional[str] = None,
        allow_single_task: bool = False,
        save_loss_curves: bool = True,
        overwrite: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.check_options()
        self.block_records: List[Dict] = []
        self.loss_curves = LossCurves()

    # ------------------------------------------------------------------------------------------
    # checks
    # ------------------------------------------------------------------------------------------

    def check_options(self) -> None:
        """Raise ``ValueError`` naming the first invalid option."""
        check_int("shots_per_task", self.shots_per_task, 1)
        check_choice("data_source", self.data_source, HELD_OUT_SOURCES)
        check_int("seed", self.seed, 0)
        check_positive("lr", self.lr)
        check_finite_number("lr", self.lr)
        check_int("epochs_per_block", self.epochs_per_block, 1)
        check_int("batch_size", self.batch_size, 1)
        check_finite_number("init_lambda", self.init_lambda)
        check_finite_number("ta_lambda", self.ta_lambda)
        check_choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        check_choice("activation_cache", self.activation_cache, CACHE_PLACEMENTS)
        if self.scratch_dir is not None and not isinstance(self.scratch_dir, (str, Path)):
            raise ValueError(
                f"invalid value {self.scratch_dir!r} for option `scratch_dir`: expected a path or null"
            )
        check_bool("allow_single_task", self.allow_single_task)
        check_bool("save_loss_curves", self.save_loss_curves)
        check_bool("overwrite", self.overwrite)

    def check_outputs(self) -> None:
        """Before any work: the log dir, ``merged_model_save_path`` and the program's report path are
        writable, and no earlier output would be overwritten (unless ``overwrite``)."""
        program = self._program
        check_output_locations(
            log_dir=self.log_dir if self.fabric.is_global_zero else None,
            merged_model_save_path=getattr(program, "merged_model_save_path", None),
            report_save_path=getattr(program, "report_save_path", None),
            overwrite=self.overwrite,
            artefacts=OUTPUT_FILES,
        )

    def validate_pool(
        self, reference: Dict[str, tuple], readers: Dict[str, WeightReader]
    ) -> Dict[int, List[str]]:
        """Structure and value checks on every model, before any training (spec §6).

        Args:
            reference: ``{canonical name: shape}`` of the pretrained model's vision parameters.
            readers: block-wise readers of ``_pretrained_`` and every task model.

        Returns:
            ``{block index: [local parameter names]}`` of the pretrained model.

        Raises:
            ValueError: naming the model and block when a block's parameter names differ, the model
                and parameter for a missing/unexpected parameter or a shape mismatch, and the model
                and parameter for NaN/inf values.
        """
        layout = self._layout
        ref_blocks, _ = layout.group_names(reference)
        if not ref_blocks:
            raise ValueError(
                f"model {PRETRAINED!r} has no `{layout.block_prefix('<l>')}*` parameters: not a "
                f"CLIP vision model ({layout.name})?"
            )
        for name, reader in readers.items():
            blocks, _ = layout.group_names(reader.shapes())
            check_same_groups(PRETRAINED, ref_blocks, name, blocks, what="block")
        # shapes, then NaN/inf: stream every model block by block (never a whole model at once).
        groups = layout.weight_groups(reference)
        for name, reader in readers.items():
            check_model_weights(PRETRAINED, reference, name, reader, groups)
        return ref_blocks

    # ------------------------------------------------------------------------------------------
    # the algorithm
    # ------------------------------------------------------------------------------------------

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
        self.block_records, self.loss_curves = [], LossCurves()
        own_scratch = self.scratch_dir is None
        scratch = Path(tempfile.mkdtemp(prefix="prodistill_") if own_scratch else self.scratch_dir)
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
                merged_model = _copy_module(merged_model)
            backbone = vision_backbone(merged_model)
            self._layout = layout = block_layout(merged_model)
            out_params = canonical_parameters(merged_model)
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

        # --- non-block parameters: task arithmetic (spec §1.1, §1.5) --------------------------
        with self.profile("task arithmetic (non-block)"):
            base_other = readers[PRETRAINED].read(other_names)
            task_other = [readers[t].read(other_names) for t in tasks]
            ta_other = task_arithmetic_merge(base_other, task_other, self.ta_lambda)
            check_finite("ProDistill merged model", ta_other)
            with torch.no_grad():
                for n, value in ta_other.items():
                    out_params[n].copy_(value.to(out_params[n].dtype))

        # --- stage 0: dual inputs (spec §1.3) -------------------------------------------------
        with self.profile("stage 0: embeddings"):
            first_block = next(iter(ref_blocks))
            block_numel = sum(
                out_params[layout.block_prefix(first_block) + n].numel()
                for n in ref_blocks[first_block]
            )
            cache = self._stage0(
                backbone, images, ta_other, task_other, device, scratch, block_numel
            )
            self._cache_info = {"placement": cache.placement, "mb": cache.nbytes / 2**20}
        del base_other, task_other, images
        gc.collect()
        setup_seconds = time.perf_counter() - t0
        log.info(
            f"ProDistill: {len(cache)} samples, {len(ref_blocks)} blocks, cache "
            f"{cache.nbytes / 2**20:.1f} MiB ({cache.placement}), setup {setup_seconds:.1f} s"
        )

        # --- blocks, one at a time (spec §1.4) -------------------------------------------------
        generator = torch.Generator().manual_seed(self.seed)
        merged_dir = scratch / "merged_blocks"
        merged_dir.mkdir(parents=True, exist_ok=True)
        layers = layout.blocks(backbone)
        try:
            for index, local_names in ref_blocks.items():
                template = empty_block_like(layers[index], getattr(merged_model, "config", None))
                if template is None:  # cannot build an empty block: copy the pretrained one
                    template = self.to_device(_copy_module(layers[index]))
                record = self._distill_block(
                    index, local_names, template, readers, tasks, cache, device, generator
                )
                check_finite(  # nothing non-finite is kept, saved or evaluated
                    "ProDistill merged model",
                    {layout.block_prefix(index) + n: v for n, v in record["merged"].items()},
                )
                # Like the official code, finished blocks go to disk, not into the output model:
                # writing into it now would make its (lazily mapped) weights resident one block
                # at a time, so the loop's peak memory would grow with depth.
                save_file(
                    {n: v.contiguous() for n, v in record.pop("merged").items()},
                    str(merged_dir / f"block_{index:03d}.safetensors"),
                )
                self.block_records.append(record)
                if self.log_dir is not None:
                    self.fabric.log_dict(
                        {
                            "prodistill/loss_before": record["loss_before"],
                            "prodistill/loss_after": record["loss_after"],
                            "prodistill/block_seconds": record["seconds"],
                        },
                        step=index,
                    )
                log.info(
                    f"block {index}: loss {record['loss_before']:.4g} -> {record['loss_after']:.4g}, "
                    f"{record['seconds']:.1f} s, peak RSS {record['peak_rss_mb']:.0f} MiB"
                    + (
                        f", CUDA peak {record['cuda_peak_mb']:.0f} MiB"
                        if record["cuda_peak_mb"] is not None
                        else ""
                    )
                )
        finally:
            cache.close()
        gc.collect()

        with self.profile("assemble output"), torch.no_grad():
            for index, local_names in ref_blocks.items():
                merged = load_file(str(merged_dir / f"block_{index:03d}.safetensors"))
                for n, value in merged.items():
                    p = out_params[layout.block_prefix(index) + n]
                    p.copy_(value.to(p.device, p.dtype))
                del merged
        shutil.rmtree(merged_dir, ignore_errors=True)
        shutil.rmtree(scratch / "converted", ignore_errors=True)

        self._write_outputs(tasks, setup_seconds, time.perf_counter() - t0)
        self.print_profile_summary()
        return merged_model

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

    @torch.no_grad()
    def _stage0(self, backbone, images, ta_other, task_other, device, scratch, block_numel):
        """Student stream: TA embedding stage; teacher stream: each task model's own (spec §1.3).

        The images are processed and embedded batch by batch (never all pixels at once); the
        cache goes where :func:`~.activations.cache_placement` says.
        """
        layout = self._layout
        emb_names = [n for n in ta_other if layout.is_embedding(n)]
        counts = [len(im) for im in images]
        stages = {
            name: self.to_device(_copy_module(module))
            for name, module in layout.embedding_stage_modules(backbone).items()
        }
        stage = _Stage(stages)
        student_params = {n: self.to_device(ta_other[n]) for n in emb_names}
        embed = layout.call_embedding_stage
        first = embed(stage, student_params, self.to_device(images[0][0][None]))
        cache = DualStreamCache(
            sum(counts),
            first.shape[1],
            first.shape[2],
            stack_task_ids(counts),
            placement=self._placement(
                sum(counts),
                first.shape,
                block_numel,
                len(images),
                device,
                getattr(backbone, "config", None),
            ),
            device=device,
            directory=scratch / "activations",
        )
        offset = 0
        for i, task_images in enumerate(images):
            teacher_params = {n: self.to_device(task_other[i][n]) for n in emb_names}
            loader = torch.utils.data.DataLoader(task_images, batch_size=self.batch_size)
            for pixels in loader:
                chunk = torch.arange(offset, offset + len(pixels))
                x = self.to_device(pixels)
                cache.scatter("student", chunk, embed(stage, student_params, x))
                cache.scatter("teacher", chunk, embed(stage, teacher_params, x))
                offset += len(pixels)
        return cache

    def _placement(
        self, num_samples: int, token_shape, block_numel: int, num_tasks: int, device, config
    ) -> str:
        """Resolve ``activation_cache`` for a cache of ``num_samples`` x ``token_shape[1:]``."""
        _, seq_len, hidden = token_shape
        working = block_working_bytes(
            block_numel,
            num_tasks,
            self.batch_size,
            seq_len,
            hidden,
            getattr(config, "intermediate_size", 4 * hidden),
            getattr(config, "num_attention_heads", max(1, hidden // 64)),
        )
        free = None
        if torch.device(device).type == "cuda":
            free = torch.cuda.mem_get_info(torch.device(device))[0]
        return cache_placement(
            self.activation_cache, device, 2 * 4 * num_samples * seq_len * hidden, working, free
        )

    def _distill_block(
        self,
        index: int,
        local_names: List[str],
        template: nn.Module,
        readers: Dict[str, WeightReader],
        tasks: List[str],
        cache: DualStreamCache,
        device,
        generator: torch.Generator,
    ) -> Dict:
        """Train block ``index``'s coefficients, then propagate both streams (spec §1.4)."""
        reset_cuda_peak(device)
        t_block = time.perf_counter()
        layout = self._layout
        call_block = layout.call_block
        names = [layout.block_prefix(index) + n for n in local_names]
        template.eval()
        for p in template.parameters():
            p.requires_grad_(False)

        # 1. weights of this block only: θ0, then for each task θ_i → τ_i and the teacher pass
        with self.profile("load block + teacher pass"):
            base = _local(self.to_device_all(readers[PRETRAINED].read(names)), index, layout)
            tau = {
                n: torch.empty((len(tasks),) + tuple(p.shape), device=p.device)
                for n, p in base.items()
            }
            with torch.no_grad():
                for i, task in enumerate(tasks):
                    theta = _local(self.to_device_all(readers[task].read(names)), index, layout)
                    for n in local_names:
                        tau[n][i] = theta[n] - base[n]
                    # teacher stream: own fine-tuned block, computed once (it does not depend on α);
                    # the result is this block's target and the next block's teacher input.
                    for chunk in cache.chunks(cache.indices_of_task(i), self.batch_size):
                        out = call_block(template, theta, cache.gather("teacher", chunk))
                        cache.scatter("teacher", chunk, out)
                    del theta
        t_loaded = time.perf_counter()

        # 2. train the element-wise coefficients
        coefficients = {
            n: t.requires_grad_(True) for n, t in init_coefficients(tau, self.init_lambda).items()
        }
        optimizer = torch.optim.Adam(list(coefficients.values()), lr=self.lr)
        with torch.no_grad():  # whole-set loss at the initial (task-arithmetic) coefficients
            loss_before = self._set_loss(template, base, tau, coefficients, cache, device)
        steps_per_epoch = -(-len(cache) // self.batch_size)
        epochs = 1 if self.is_debug_mode else self.epochs_per_block
        total_steps = 1 if self.is_debug_mode else epochs * steps_per_epoch
        step, epoch_losses = 0, []
        with self.profile("train block"):
            for epoch in range(epochs):
                total = 0.0
                for chunk in cache.shuffled_batches(self.batch_size, generator):
                    z1 = cache.gather("student", chunk)
                    target = cache.gather("teacher", chunk)
                    merged = merge_elementwise(base, tau, coefficients)
                    loss = block_loss(call_block(template, merged, z1), target, self.loss_reduction)
                    value = float(loss.detach())
                    check_finite_loss(
                        "ProDistill", value, step + 1, total_steps, where=f" of block {index}"
                    )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    self.loss_curves.add(index, step, epoch, value)
                    total += value
                    step += 1
                    if self.is_debug_mode:  # fast_dev_run: one step per block
                        break
                epoch_losses.append(total / (1 if self.is_debug_mode else steps_per_epoch))
        t_trained = time.perf_counter()

        # 3. propagate the student stream through the trained merged block
        with self.profile("propagate"), torch.no_grad():
            merged = merge_elementwise(base, tau, coefficients)
            sq_error = 0.0
            for chunk in cache.chunks(torch.arange(len(cache)), self.batch_size):
                out = call_block(template, merged, cache.gather("student", chunk))
                sq_error += float(block_loss(out, cache.gather("teacher", chunk), "sum"))
                cache.scatter("student", chunk, out)
            loss_after = sq_error / len(cache)
            merged = {n: v.detach().cpu() for n, v in merged.items()}
            coef_mean = [
                float(
                    sum(c[i].sum() for c in coefficients.values())
                    / sum(c[i].numel() for c in coefficients.values())
                )
                for i in range(len(tasks))
            ]
            coef_by_param = {
                n: [float(c[i].mean()) for i in range(len(tasks))] for n, c in coefficients.items()
            }
        curve = self.loss_curves.of_block(index)
        record = {
            "block": index,
            "steps": step,
            "epochs": epochs,
            "loss_before": loss_before,
            "loss_after": loss_after,
            "first_step_loss": curve[0]["loss"],
            "last_epoch_loss": epoch_losses[-1],
            "mean_coefficient": dict(zip(tasks, coef_mean)),
            "mean_coefficient_per_parameter": coef_by_param,
            "seconds": time.perf_counter() - t_block,
            "seconds_load_and_teacher": t_loaded - t_block,
            "seconds_train": t_trained - t_loaded,
            "seconds_propagate": time.perf_counter() - t_trained,
            "peak_rss_mb": peak_rss_mb(),
            "rss_mb": current_rss_mb(),
            "cuda_peak_mb": cuda_peak_mb(device),
            "merged": merged,
        }
        # 4. free everything of this block before the next one
        del coefficients, optimizer, tau, base, template
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        return record

    def _set_loss(self, template, base, tau, coefficients, cache, device) -> float:
        """Squared feature error per sample (summed over tokens and hidden units), averaged over
        the whole few-shot set."""
        merged = merge_elementwise(base, tau, coefficients)
        total = 0.0
        for chunk in cache.chunks(torch.arange(len(cache)), self.batch_size):
            out = self._layout.call_block(template, merged, cache.gather("student", chunk))
            total += float(block_loss(out, cache.gather("teacher", chunk), "sum"))
        return total / len(cache)

    def to_device_all(self, tensors: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return {n: self.to_device(t) for n, t in tensors.items()}

    # ------------------------------------------------------------------------------------------
    # outputs
    # ------------------------------------------------------------------------------------------

    def _write_outputs(self, tasks: List[str], setup_seconds: float, total_seconds: float) -> None:
        """Timing/memory JSON and loss curves into ``log_dir`` (rank 0 only), plus a log summary."""
        summary = {
            "algorithm": "prodistill",
            "tasks": tasks,
            "few_shot_images": dict(self._data_info),
            "few_shot_data": dict(self._data_read),
            "weight_sources": dict(self._sources),
            "options": {k: getattr(self, k) for k in self._config_mapping if not k.startswith("_")},
            "activation_cache": dict(getattr(self, "_cache_info", {})),
            "setup_seconds": setup_seconds,
            "total_seconds": total_seconds,
            "peak_rss_mb": peak_rss_mb(),
            "blocks": self.block_records,
        }
        self.report = _json_safe(summary)
        log.info(
            f"ProDistill: {len(self.block_records)} blocks in {total_seconds:.1f} s, "
            f"peak RSS {summary['peak_rss_mb']:.0f} MiB"
        )
        if self.log_dir is None or not self.fabric.is_global_zero:
            return
        out = Path(self.log_dir)
        write_json(out / "prodistill_report.json", self.report)
        if self.save_loss_curves:
            self.loss_curves.write_csv(out / "prodistill_loss_curves.csv")
            for record in self.block_records:
                b = record["block"]
                self.loss_curves.plot_block(
                    b, out / "prodistill_loss_curves" / f"block_{b:02d}.png"
                )


class _Stage(nn.Module):
    """Holds copies of the embedding-stage modules (``embeddings`` and ``pre_layrnorm``; open_clip:
    ``conv1`` and ``ln_pre``) under their backbone names."""

    def __init__(self, modules: Dict[str, nn.Module]):
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)


def _copy_module(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


def _local(
    tensors: Dict[str, Tensor], index: int, layout: BlockLayout = HF_CLIP_LAYOUT
) -> Dict[str, Tensor]:
    prefix = layout.block_prefix(index)
    return {n[len(prefix) :]: t for n, t in tensors.items()}


def _json_safe(value):
    import math

    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Tensor):
        return _json_safe(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return _json_safe(OmegaConf.to_container(value, resolve=True))
    except Exception:  # noqa: BLE001
        pass
    return str(value)
