R"""ProDistill's stage 0 (spec §1.3): the dual inputs of block 0 for every few-shot sample, and
where the cache of the two streams lives (:mod:`.activations`).

The student stream starts from the task-arithmetic embedding stage, the teacher stream from each
sample's own task model's embedding stage; inputs are embedded batch by batch in the compute dtype,
only the samples this rank holds (:class:`~.sharding.SampleShard`).
"""

from __future__ import annotations

import copy
from typing import Dict

import torch
from torch import Tensor, nn

from .activations import DualStreamCache, block_working_bytes, cache_placement, stack_task_ids
from .sharding import SampleShard


class DualInputStage:
    """``stage0`` of :class:`~.engine.ProDistillEngine` (uses its options, Fabric, layout and
    ``_compute_dtype``)."""

    def _batches(self, inputs):
        if hasattr(inputs, "batches"):  # tokenized text shots
            return inputs.batches(self.batch_size)
        return torch.utils.data.DataLoader(inputs, batch_size=self.batch_size)

    def _to_device_batch(self, batch):
        """A batch on the compute device; images (floating tensors) in the compute dtype."""
        if isinstance(batch, dict):
            return {k: self._to_device_batch(v) for k, v in batch.items()}
        batch = self.to_device(batch)
        return batch.to(self._compute_dtype) if batch.is_floating_point() else batch

    @torch.no_grad()
    def stage0(self, backbone, inputs, student_emb, readers, tasks, device, scratch, block_numel):
        """Student stream: the task-arithmetic embedding stage; teacher stream: each task model's own
        (spec §1.3). Sets ``self._shard``; the cache goes where :func:`~.activations.cache_placement`
        says."""
        layout, dtype = self._layout, self._compute_dtype
        emb_names = sorted(student_emb)
        stage = _Stage(
            {
                name: self.to_device(copy.deepcopy(module))
                for name, module in layout.embedding_stage_modules(backbone).items()
            }
        )
        student = {n: self.to_device(student_emb[n]).to(dtype) for n in emb_names}
        counts = [len(x) for x in inputs]
        shard = self._shard = SampleShard(
            sum(counts), self.fabric.global_rank, self.fabric.world_size
        )
        if len(shard) == 0:
            raise ValueError(
                f"ProDistill: {sum(counts)} few-shot samples cannot be shared by "
                f"{shard.world_size} ranks (fabric.devices); raise shots_per_task or use fewer devices"
            )
        masks = torch.cat([x.masks for x in inputs]) if hasattr(inputs[0], "masks") else None
        cache, offset, row = None, 0, 0
        for i, task_inputs in enumerate(inputs):
            teacher = self.to_device_all(readers[tasks[i]].read(emb_names, dtype))
            for batch in self._batches(task_inputs):
                size = _batch_len(batch)
                keep = shard.positions_in(offset, size)
                offset += size
                if len(keep) == 0:
                    continue
                x = self._to_device_batch(_rows(batch, keep))
                out = layout.call_embedding_stage(stage, student, x)
                if cache is None:
                    cache = DualStreamCache(
                        len(shard),
                        out.shape[1],
                        out.shape[2],
                        shard.local_task_ids(stack_task_ids(counts)),
                        placement=self._placement(
                            len(shard), out.shape, block_numel, len(tasks), device, backbone
                        ),
                        device=device,
                        directory=scratch / "activations",
                        masks=None if masks is None else masks[shard.owned],
                        dtype=dtype,
                    )
                chunk = torch.arange(row, row + out.shape[0])
                cache.scatter("student", chunk, out)
                cache.scatter("teacher", chunk, layout.call_embedding_stage(stage, teacher, x))
                row += out.shape[0]
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
        element = torch.empty((), dtype=self._compute_dtype).element_size()
        return cache_placement(
            self.activation_cache,
            device,
            2 * element * num_samples * seq_len * hidden,
            working,
            free,
        )


class _Stage(nn.Module):
    """Holds copies of the embedding-stage modules under their backbone names."""

    def __init__(self, modules: Dict[str, nn.Module]):
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)


def _batch_len(batch) -> int:
    if isinstance(batch, dict):
        return len(next(iter(batch.values())))
    return len(batch)


def _rows(batch, keep: Tensor):
    if isinstance(batch, dict):
        return {k: v[keep] for k, v in batch.items()}
    return batch[keep]
