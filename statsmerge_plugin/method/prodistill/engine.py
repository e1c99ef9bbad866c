R"""ProDistill's block engine: the progressive loop for any stack of blocks (spec §1.3–§1.6).

:class:`ProDistillEngine` holds everything that does not depend on the modality: options and their
checks and pool validation (:class:`~.checks.EngineChecks`), task arithmetic outside the blocks (one
tensor at a time), stage 0 (the dual inputs), the per-block training of element-wise coefficients
with each sample's own teacher, propagation, and the records (:class:`~.reporting.ReportWriter`). A
subclass supplies the few-shot inputs and the output model (:class:`~.prodistill.ProDistillForCLIP`
for images, :mod:`.language` for GPT-2 and causal LMs);
the per-architecture adapter (:class:`~.layers.BlockLayout`) says how to embed and call a block.

Memory (spec §1.6): per block, ``θ_0`` and the stacked ``θ_i`` in the stored dtype (float32 for the
vision pools, e.g. bfloat16 for LLM pools), float32 coefficients and their Adam moments, the merged
float32 block for the forward pass; task vectors are recomputed from the weights inside the merge
(:func:`.merge.merge_from_weights`) and each coefficient's Adam step runs as soon as its gradient
exists (``optimizer_in_backward``), so no block-sized float32 task vectors or gradients stay alive.
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
from ...validation import check_finite, check_finite_loss
from .activations import (
    DualStreamCache,
    block_working_bytes,
    cache_placement,
    stack_task_ids,
)
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

log = logging.getLogger(__name__)


@auto_register_config
class ProDistillEngine(
    EngineChecks, ReportWriter, LightningFabricMixin, SimpleProfilerMixin, BaseAlgorithm
):
    """The options every ProDistill variant shares (see ``config/method/prodistill/clip.yaml``):
    ``shots_per_task``, ``seed``, ``lr``, ``epochs_per_block``, ``batch_size``, ``init_lambda``,
    ``ta_lambda``, ``loss_reduction``, ``activation_cache``, ``scratch_dir``,
    ``allow_single_task``, ``save_loss_curves``, ``overwrite``; and ``optimizer_in_backward``
    (each coefficient tensor's Adam step inside ``backward()``, its gradient freed at once: the same
    steps, one tensor's gradient in memory instead of the block's).
    """

    #: the adapter (set from the pool's models in ``run``)
    _layout: BlockLayout = HF_CLIP_LAYOUT
    #: dtype the block weights are read in: float32, or ``None`` for the stored dtype
    _weights_dtype: Optional[torch.dtype] = torch.float32

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
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.check_options()
        self.block_records: List[Dict] = []
        self.loss_curves = LossCurves()

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

    # --- stage 0: dual inputs (spec §1.3) --------------------------------------------------------

    def _batches(self, inputs):
        if hasattr(inputs, "batches"):  # tokenized text shots
            return inputs.batches(self.batch_size)
        return torch.utils.data.DataLoader(inputs, batch_size=self.batch_size)

    def _to_device_batch(self, batch):
        if isinstance(batch, dict):
            return {k: self.to_device(v) for k, v in batch.items()}
        return self.to_device(batch)

    @torch.no_grad()
    def stage0(self, backbone, inputs, student_emb, readers, tasks, device, scratch, block_numel):
        """Student stream: the task-arithmetic embedding stage; teacher stream: each task model's own
        (spec §1.3). Inputs are embedded batch by batch; the cache goes where
        :func:`~.activations.cache_placement` says."""
        import copy

        layout = self._layout
        emb_names = sorted(student_emb)
        stages = {
            name: self.to_device(copy.deepcopy(module))
            for name, module in layout.embedding_stage_modules(backbone).items()
        }
        stage = _Stage(stages)
        student = {n: self.to_device(student_emb[n]) for n in emb_names}
        counts = [len(x) for x in inputs]
        masks = [x.masks for x in inputs] if hasattr(inputs[0], "masks") else None
        cache, offset = None, 0
        for i, task_inputs in enumerate(inputs):
            teacher = self.to_device_all(readers[tasks[i]].read(emb_names))
            for batch in self._batches(task_inputs):
                x = self._to_device_batch(batch)
                out = layout.call_embedding_stage(stage, student, x)
                if cache is None:
                    cache = DualStreamCache(
                        sum(counts),
                        out.shape[1],
                        out.shape[2],
                        stack_task_ids(counts),
                        placement=self._placement(
                            sum(counts), out.shape, block_numel, len(tasks), device, backbone
                        ),
                        device=device,
                        directory=scratch / "activations",
                        masks=None if masks is None else torch.cat(masks),
                    )
                chunk = torch.arange(offset, offset + out.shape[0])
                cache.scatter("student", chunk, out)
                cache.scatter("teacher", chunk, layout.call_embedding_stage(stage, teacher, x))
                offset += out.shape[0]
            del teacher
        return cache

    def _placement(self, num_samples, token_shape, block_numel, num_tasks, device, backbone):
        """Resolve ``activation_cache`` for a cache of ``num_samples`` x ``token_shape[1:]``."""
        _, seq_len, hidden = token_shape
        config = getattr(backbone, "config", None)
        working = block_working_bytes(
            block_numel,
            num_tasks,
            self.batch_size,
            seq_len,
            hidden,
            getattr(config, "intermediate_size", None) or 4 * hidden,
            getattr(config, "num_attention_heads", None) or max(1, hidden // 64),
        )
        free = None
        if torch.device(device).type == "cuda":
            free = torch.cuda.mem_get_info(torch.device(device))[0]
        return cache_placement(
            self.activation_cache, device, 2 * 4 * num_samples * seq_len * hidden, working, free
        )

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
        dtype = self._weights_dtype

        # 1. weights of this block only: θ0 and every θ_i (stored dtype), and the teacher pass
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
                    theta = {n: t.to(torch.float32) for n, t in theta.items()}
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
        in_backward = self.optimizer_in_backward
        if in_backward:
            optimisers = adam_in_backward(params, self.lr)
        else:
            optimizer = torch.optim.Adam(params, lr=self.lr)
        with torch.no_grad():  # whole-set loss at the initial (task-arithmetic) coefficients
            loss_before = self._set_loss(template, base, weights, coefficients, cache)
        steps_per_epoch = -(-len(cache) // self.batch_size)
        epochs = 1 if self.is_debug_mode else self.epochs_per_block
        total_steps = 1 if self.is_debug_mode else epochs * steps_per_epoch
        step, epoch_losses = 0, []
        with self.profile("train block"):
            for epoch in range(epochs):
                total = 0.0
                for chunk in cache.shuffled_batches(self.batch_size, generator):
                    mask = cache.gather_mask(chunk)
                    z1 = cache.gather("student", chunk)
                    target = cache.gather("teacher", chunk)
                    merged = merge_from_weights(base, weights, coefficients)
                    student = call_block(template, merged, z1, mask)
                    loss = block_loss(student, target, self.loss_reduction, mask)
                    value = float(loss.detach())
                    check_finite_loss(
                        "ProDistill", value, step + 1, total_steps, where=f" of block {index}"
                    )
                    if not in_backward:
                        optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if not in_backward:
                        optimizer.step()
                    del merged, student, loss
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
            merged = merge_from_weights(base, weights, coefficients)
            sq_error = 0.0
            for chunk in cache.chunks(torch.arange(len(cache)), self.batch_size):
                mask = cache.gather_mask(chunk)
                out = call_block(template, merged, cache.gather("student", chunk), mask)
                sq_error += float(block_loss(out, cache.gather("teacher", chunk), "sum", mask))
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
        del coefficients, params, weights, base, template
        if in_backward:
            del optimisers
        else:
            del optimizer
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        return record

    def _set_loss(self, template, base, weights, coefficients, cache) -> float:
        """Squared feature error per sample (summed over real tokens and hidden units), averaged over
        the whole few-shot set."""
        merged = merge_from_weights(base, weights, coefficients)
        total = 0.0
        for chunk in cache.chunks(torch.arange(len(cache)), self.batch_size):
            mask = cache.gather_mask(chunk)
            out = self._layout.call_block(template, merged, cache.gather("student", chunk), mask)
            total += float(block_loss(out, cache.gather("teacher", chunk), "sum", mask))
        return total / len(cache)

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
                stored = self._stored_dtypes(readers[PRETRAINED], merged)
                save_file(
                    {n: v.to(stored[n]).contiguous() for n, v in merged.items()},
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

    def _stored_dtypes(self, reader: WeightReader, tensors: Dict[str, Tensor]) -> Dict:
        """float32 for float32 reads; with ``_weights_dtype=None`` the pool's stored dtype."""
        if self._weights_dtype is not None:
            return {n: self._weights_dtype for n in tensors}
        dtypes = reader.dtypes() if hasattr(reader, "dtypes") else {}
        return {n: dtypes.get(n, torch.float32) for n in tensors}


class _Stage(nn.Module):
    """Holds copies of the embedding-stage modules under their backbone names."""

    def __init__(self, modules: Dict[str, nn.Module]):
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)


def _local(tensors: Dict[str, Tensor], index: int, layout: BlockLayout) -> Dict[str, Tensor]:
    prefix = layout.block_prefix(index)
    return {n[len(prefix) :]: t for n, t in tensors.items()}
