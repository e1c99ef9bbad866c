R"""The dual-input activation cache of ProDistill (spec §1.3, §1.4 step 3, §1.6).

For every few-shot sample ``x`` of task ``t(x)`` the cache holds two hidden states of shape
``[seq, hidden]``:

* the **student stream** ``z1``: the input of the current block along the merged model (stage 0: the
  embedding-stage output of the task-arithmetic model);
* the **teacher stream** ``z2``: the input of the current block along the sample's *own* fine-tuned
  model (stage 0: that model's embedding-stage output).

Both streams live in host memory (or, with ``on_disk=True``, in two files mapped into memory with
``torch.from_file``, so the OS can page them out), never on the compute device; minibatches are
copied to the device on demand and results are written back in place, batch by batch. Each sample
only depends on itself inside a transformer block, so in-place updates are exact.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class DualStreamCache:
    """Student and teacher hidden states of ``N`` samples plus their task indices.

    Args:
        num_samples: ``N``.
        seq_len, hidden: per-sample hidden-state shape.
        task_ids: ``[N]`` task index of every sample.
        on_disk: back the two streams by files in ``directory`` instead of anonymous host memory.
        directory: where the files go when ``on_disk``.
    """

    def __init__(
        self,
        num_samples: int,
        seq_len: int,
        hidden: int,
        task_ids: Tensor,
        on_disk: bool = False,
        directory: Optional[Path] = None,
    ):
        if task_ids.shape != (num_samples,):
            raise ValueError(
                f"task_ids must have shape ({num_samples},), got {tuple(task_ids.shape)}"
            )
        self.shape = (num_samples, seq_len, hidden)
        self.task_ids = task_ids.to(torch.long).cpu()
        self.on_disk = on_disk
        self.files = []
        if on_disk:
            if directory is None:
                raise ValueError("DualStreamCache(on_disk=True) needs a directory")
            directory = Path(directory)
            directory.mkdir(parents=True, exist_ok=True)
            self.student = self._file_tensor(directory / "student_stream.bin")
            self.teacher = self._file_tensor(directory / "teacher_stream.bin")
        else:
            self.student = torch.zeros(self.shape, dtype=torch.float32)
            self.teacher = torch.zeros(self.shape, dtype=torch.float32)

    def _file_tensor(self, path: Path) -> Tensor:
        numel = self.shape[0] * self.shape[1] * self.shape[2]
        path.unlink(missing_ok=True)
        t = torch.from_file(str(path), shared=True, size=numel, dtype=torch.float32)
        self.files.append(path)
        return t.view(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return 2 * self.student.numel() * self.student.element_size()

    def indices_of_task(self, task: int) -> Tensor:
        return torch.nonzero(self.task_ids == task, as_tuple=False).flatten()

    @staticmethod
    def chunks(indices: Tensor, batch_size: int) -> Iterator[Tensor]:
        for start in range(0, len(indices), batch_size):
            yield indices[start : start + batch_size]

    def shuffled_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
        """One epoch of mixed-task minibatch indices (spec §1.1 "Batch size")."""
        perm = torch.randperm(len(self), generator=generator)
        yield from self.chunks(perm, batch_size)

    def gather(self, stream: str, indices: Tensor, device) -> Tensor:
        return getattr(self, stream)[indices].to(device, non_blocking=False)

    def scatter(self, stream: str, indices: Tensor, values: Tensor) -> None:
        getattr(self, stream)[indices] = values.detach().to("cpu", torch.float32)

    def close(self) -> None:
        """Drop the tensors and delete backing files, if any."""
        self.student = self.teacher = None
        for path in self.files:
            Path(path).unlink(missing_ok=True)
        self.files = []


def stack_task_ids(counts: Sequence[int]) -> Tensor:
    """``[3, 2]`` → ``tensor([0, 0, 0, 1, 1])``."""
    return torch.cat([torch.full((c,), i, dtype=torch.long) for i, c in enumerate(counts)])
