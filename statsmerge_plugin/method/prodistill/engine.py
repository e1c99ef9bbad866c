R"""ProDistill's block engine: the progressive loop for any stack of blocks (spec §1.3–§1.6).

:class:`ProDistillEngine` holds everything that does not depend on the modality: options and their
checks and pool validation (:class:`~.checks.EngineChecks`), task arithmetic outside the blocks (one
tensor at a time), stage 0 (the dual inputs, :mod:`.stage0`), the per-block training of element-wise
coefficients with each sample's own teacher, propagation, and the records
(:class:`~.reporting.ReportWriter`). A subclass supplies the few-shot inputs and the output model
(:class:`~.prodistill.ProDistillForCLIP` for images, :mod:`.language` for GPT-2 and causal LMs);
the per-architecture adapter (:class:`~.layers.BlockLayout`) says how to embed and call a block.

Memory (spec §1.6): per block, ``θ_0`` and the stacked ``θ_i`` in the compute dtype (the pool's by
default: float32 for the vision pools, bfloat16 for FusionBench's LLM pools), float32 coefficients
and their Adam moments, the merged block (computed in float32, used in the compute dtype); task
vectors are recomputed from the weights inside the merge (:func:`.merge.merge_from_weights`) and
each coefficient's Adam step runs as soon as its gradient exists (``optimizer_in_backward``), so no
block-sized float32 task vectors or gradients stay alive. The activation cache and every block pass
are in the compute dtype; losses are summed in float32.

Several devices (``fabric.devices=N``): the few-shot samples are sharded across the ranks and the
coefficient gradients all-reduced (:mod:`.sharding`); every rank keeps its own scratch directory
(:meth:`ProDistillEngine.rank_scratch`) and only rank 0 writes the report.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from fusion_bench.method.base_algorithm import BaseAlgorithm
from fusion_bench.mixins import LightningFabricMixin, SimpleProfilerMixin, auto_register_config
from torch import Tensor, nn

from ...memory import release_free_memory
from ...model_io import WeightReader
from ...precision import resolve_compute_dtype
from ...validation import check_finite, check_finite_loss
from .activations import DualStreamCache
from .checks import OUTPUT_FILES, PRETRAINED, EngineChecks  # noqa: F401 - re-exported
from .layers import HF_CLIP_LAYOUT, BlockLayout, block_template
from .merge import adam_in_backward, block_loss, merge_from_weights, remove_hooks
from .reporting import (
    LossCurves,
    ReportWriter,
    cuda_peak_mb,
    current_rss_mb,
    peak_rss_mb,
    reset_cuda_peak,
)
from .sharding import all_reduce_gradients, all_reduce_sum, max_rank_difference
from .stage0 import DualInputStage

log = logging.getLogger(__name__)


@auto_register_config
class ProDistillEngine(
    DualInputStage,
    EngineChecks,
    ReportWriter,
    LightningFabricMixin,
    SimpleProfilerMixin,
    BaseAlgorithm,
):
    """The options every ProDistill variant shares (see ``config/method/prodistill/clip.yaml``):
    ``shots_per_task``, ``seed``, ``lr``, ``epochs_per_block``, ``batch_size``, ``init_lambda``,
    ``ta_lambda``, ``loss_reduction``, ``activation_cache``, ``scratch_dir``,
    ``allow_single_task``, ``save_loss_curves``, ``overwrite``; ``optimizer_in_backward``
    (each coefficient tensor's Adam step inside ``backward()``, its gradient freed at once: the same
    steps, one tensor's gradient in memory instead of the block's; in one process only: with
    several, the gradients are all-reduced after ``backward()``, :mod:`.sharding`); and
    ``compute_dtype`` (``None``: the pool's dtype; ``float32``, ``bfloat16``, ``float16``): the
    dtype of the block weights, the merged block, the activation cache and the block passes; the
    coefficients, their Adam moments and the losses stay float32 (:mod:`statsmerge_plugin.precision`).
    """

    #: the adapter (set from the pool's models in ``run``)
    _layout: BlockLayout = HF_CLIP_LAYOUT
    #: the dtype of the weights, activations and block passes (:meth:`set_dtypes`)
    _compute_dtype: torch.dtype = torch.float32

    def __init__(
        self,
        shots_per_task: int = 64,
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
        optimizer_in_backward: bool = True,
        compute_dtype: Optional[str] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.check_options()
        self.block_records: List[Dict] = []
        self.loss_curves = LossCurves()

    def rank_scratch(self, scratch: Path) -> Path:
        """``scratch`` itself in one process; ``scratch/rank<r>`` with several, so that no rank
        writes or deletes another's converted checkpoints, merged blocks or activation files."""
        if self.fabric.world_size == 1:
            return scratch
        return scratch / f"rank{self.fabric.global_rank}"

    def set_dtypes(self, out_params: Dict[str, Tensor]) -> None:
        """The compute dtype (``compute_dtype``, else the output model's) and the dtype every merged
        tensor is written in (the output model's, i.e. the pool's)."""
        floating = [p.dtype for p in out_params.values() if p.is_floating_point()]
        pool_dtype = floating[0] if floating else torch.float32
        self._compute_dtype = resolve_compute_dtype(self.compute_dtype, pool_dtype)
        self._out_dtypes = {n: p.dtype for n, p in out_params.items()}
        self._dtype_info = {"pool": str(pool_dtype), "compute": str(self._compute_dtype)}

    # --- outside the blocks: task arithmetic, one tensor at a time (spec §1.1, §1.5) -------------

    def merge_outside_blocks(self, names, readers, tasks, store) -> Dict[str, Tensor]:
        """Task arithmetic ``θ_0 + λ Σ_i (θ_i − θ_0)`` of every non-block tensor, read and merged one
        tensor at a time (float32); ``store(name, value)`` keeps each result. Returns the merged
        embedding-stage tensors (the student stream's stage 0)."""
        embedding = {}
        for n in names:
            base = readers[PRETRAINED].read([n])[n]
            delta = torch.zeros_like(base)
            for t in tasks:
                delta += readers[t].read([n])[n] - base
            value = base + self.ta_lambda * delta
            check_finite("ProDistill merged model", {n: value})
            store(n, value)
            if self._layout.is_embedding(n):
                embedding[n] = value
            del base, delta
        return embedding

    # --- one block (spec §1.4) -------------------------------------------------------------------

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
        dtype, shard = self._compute_dtype, self._shard

        # 1. weights of this block only: θ0 and every θ_i (compute dtype), and the teacher pass
        with self.profile("load block + teacher pass"):
            base = _local(self.to_device_all(readers[PRETRAINED].read(names, dtype)), index, layout)
            weights = {
                n: torch.empty((len(tasks),) + tuple(p.shape), dtype=p.dtype, device=p.device)
                for n, p in base.items()
            }
            with torch.no_grad():
                for i, task in enumerate(tasks):
                    theta = _local(
                        self.to_device_all(readers[task].read(names, dtype)), index, layout
                    )
                    for n in local_names:
                        weights[n][i] = theta[n]
                    theta = {n: t.to(dtype) for n, t in theta.items()}
                    # teacher stream: own fine-tuned block, computed once (it does not depend on α);
                    # the result is this block's target and the next block's teacher input.
                    for chunk in cache.chunks(cache.indices_of_task(i), self.batch_size):
                        out = call_block(
                            template,
                            theta,
                            cache.gather("teacher", chunk),
                            cache.gather_mask(chunk),
                        )
                        cache.scatter("teacher", chunk, out)
                    del theta
        t_loaded = time.perf_counter()

        # 2. train the element-wise coefficients (spec §1.2: init 0.3, Adam, no constraint)
        coefficients = {
            n: torch.full(w.shape, float(self.init_lambda), device=w.device).requires_grad_(True)
            for n, w in weights.items()
        }
        params = list(coefficients.values())
        distributed = self.fabric.world_size > 1
        in_backward = self.optimizer_in_backward and not distributed
        if in_backward:
            optimisers = adam_in_backward(params, self.lr)
        else:
            optimizer = torch.optim.Adam(params, lr=self.lr)
        with torch.no_grad():  # whole-set loss at the initial (task-arithmetic) coefficients
            loss_before = self._set_loss(template, base, weights, coefficients, cache)
        steps_per_epoch = -(-shard.num_samples // self.batch_size)
        epochs = 1 if self.is_debug_mode else self.epochs_per_block
        total_steps = 1 if self.is_debug_mode else epochs * steps_per_epoch
        step, epoch_losses = 0, []
        with self.profile("train block"):
            for epoch in range(epochs):
                total = 0.0
                for rows, batch_len in shard.epoch(self.batch_size, generator):
                    loss = None
                    if len(rows):  # this rank's samples of the (global) minibatch
                        merged = self._merged(base, weights, coefficients)
                        loss = self._batch_loss(template, merged, cache, rows)
                        if self.loss_reduction == "mean":  # over the whole minibatch's samples
                            loss = loss / batch_len
                    value = all_reduce_sum(0.0 if loss is None else float(loss.detach()), device)
                    check_finite_loss(
                        "ProDistill", value, step + 1, total_steps, where=f" of block {index}"
                    )
                    if not in_backward:
                        optimizer.zero_grad(set_to_none=True)
                    if loss is not None:
                        loss.backward()
                        del merged
                    if not in_backward:
                        all_reduce_gradients(params)  # several ranks: sum of their gradients
                        optimizer.step()
                    del loss
                    self.loss_curves.add(index, step, epoch, value)
                    total += value
                    step += 1
                    if self.is_debug_mode:  # fast_dev_run: one step per block
                        break
                epoch_losses.append(total / (1 if self.is_debug_mode else steps_per_epoch))
        if in_backward:
            remove_hooks(optimisers)
        t_trained = time.perf_counter()

        # 3. propagate the student stream through the trained merged block
        with self.profile("propagate"), torch.no_grad():
            rank_diff = max_rank_difference(params) if distributed else None
            merged = self._merged(base, weights, coefficients)
            sq_error = 0.0
            for chunk in cache.chunks(torch.arange(len(cache)), self.batch_size):
                mask = cache.gather_mask(chunk)
                out = call_block(template, merged, cache.gather("student", chunk), mask)
                sq_error += float(block_loss(out, cache.gather("teacher", chunk), "sum", mask))
                cache.scatter("student", chunk, out)
            loss_after = all_reduce_sum(sq_error, device) / shard.num_samples
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
            "samples_this_rank": len(shard),
            "rank_max_abs_diff": rank_diff,
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
        del coefficients, params, weights, base, template
        if in_backward:
            del optimisers
        else:
            del optimizer
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        return record

    def _merged(self, base, weights, coefficients) -> Dict[str, Tensor]:
        """The merged block (computed in float32 from the weights, :func:`.merge.merge_from_weights`)
        in the compute dtype; differentiable in ``coefficients``."""
        merged = merge_from_weights(base, weights, coefficients)
        if self._compute_dtype == torch.float32:
            return merged
        return {n: v.to(self._compute_dtype) for n, v in merged.items()}

    def _batch_loss(self, template, merged, cache, rows) -> Tensor:
        """The summed squared feature error of cache rows ``rows`` through the merged block."""
        mask = cache.gather_mask(rows)
        student = self._layout.call_block(template, merged, cache.gather("student", rows), mask)
        return block_loss(student, cache.gather("teacher", rows), "sum", mask)

    def _set_loss(self, template, base, weights, coefficients, cache) -> float:
        """Squared feature error per sample (summed over real tokens and hidden units), averaged over
        the whole few-shot set (all ranks' samples)."""
        merged, total = self._merged(base, weights, coefficients), 0.0
        for chunk in cache.chunks(torch.arange(len(cache)), self.batch_size):
            total += float(self._batch_loss(template, merged, cache, chunk))
        return all_reduce_sum(total, cache.device) / self._shard.num_samples

    def to_device_all(self, tensors: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return {n: self.to_device(t) for n, t in tensors.items()}

    # --- the loop over blocks, and the records ---------------------------------------------------

    def distill_blocks(self, ref_blocks, layers, readers, tasks, cache, device, merged_dir: Path):
        """Every block in order (spec §1.4); each finished merged block is checked and written to
        ``merged_dir/block_XXX.safetensors`` in the stored dtype of ``_pretrained_``'s block (not into
        the output model: writing into lazily mapped weights would make them resident one block at a
        time, so the loop's peak memory would grow with depth)."""
        from safetensors.torch import save_file
        from tqdm.auto import tqdm

        layout = self._layout
        generator = torch.Generator().manual_seed(self.seed)
        merged_dir.mkdir(parents=True, exist_ok=True)
        try:
            for index, local_names in tqdm(
                ref_blocks.items(), desc="ProDistill blocks", disable=not self.fabric.is_global_zero
            ):
                template = block_template(layers[index], device)
                record = self._distill_block(
                    index, local_names, template, readers, tasks, cache, device, generator
                )
                merged = {
                    layout.block_prefix(index) + n: v for n, v in record.pop("merged").items()
                }
                check_finite("ProDistill merged model", merged)  # nothing non-finite is kept
                save_file(  # in the output model's (the pool's) dtype
                    {n: v.to(self._out_dtypes[n]).contiguous() for n, v in merged.items()},
                    str(merged_dir / f"block_{index:03d}.safetensors"),
                )
                del merged, template  # not alive during the next block (flat in depth)
                release_free_memory()
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
                cuda = record["cuda_peak_mb"]
                log.info(
                    f"block {index}: loss {record['loss_before']:.4g} -> "
                    f"{record['loss_after']:.4g}, {record['seconds']:.1f} s, peak RSS "
                    f"{record['peak_rss_mb']:.0f} MiB"
                    + (f", CUDA peak {cuda:.0f} MiB" if cuda is not None else "")
                )
        finally:
            cache.close()
        gc.collect()


def _local(tensors: Dict[str, Tensor], index: int, layout: BlockLayout) -> Dict[str, Tensor]:
    prefix = layout.block_prefix(index)
    return {n[len(prefix) :]: t for n, t in tensors.items()}
