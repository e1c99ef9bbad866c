R"""The dual-input activation cache of ProDistill (spec §1.3, §1.4 step 3, §1.6).

For every few-shot sample ``x`` of task ``t(x)`` the cache holds two hidden states of shape
``[seq, hidden]``:

* the **student stream** ``z1``: the input of the current block along the merged model (stage 0: the
  embedding-stage output of the task-arithmetic model);
* the **teacher stream** ``z2``: the input of the current block along the sample's *own* fine-tuned
  model (stage 0: that model's embedding-stage output).

Where the two streams live (:data:`CACHE_PLACEMENTS`, :func:`cache_placement`):

* ``device``: on the compute device; minibatches are gathered there, nothing is copied. What
  ``auto`` picks on a GPU when the cache and a block's working set fit into its free memory
  (ViT-B/32, 512 samples: 157 MB; ViT-L/14: 1.08 GB);
* ``memory``: host RAM. With a GPU the streams are *pinned* and minibatches are gathered into pinned
  staging buffers and copied with ``non_blocking=True`` (two buffers per stream in turn, each reused
  only after its previous copy has finished);
* ``disk``: two files mapped into memory with ``torch.from_file`` (the OS can page them out); copies
  go through the same staging buffers.

Results are written back in place, batch by batch. Each sample only depends on itself inside a
transformer block, so in-place updates are exact.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)

#: ``auto`` resolves to ``device`` (GPU, when it fits) or ``memory``.
CACHE_PLACEMENTS = ("auto", "device", "memory", "disk")
STREAMS = ("student", "teacher")


def block_working_bytes(
    block_numel: int,
    num_tasks: int,
    batch_size: int,
    seq_len: int,
    hidden: int,
    intermediate: int,
    heads: int,
) -> int:
    """An upper estimate of one block's working set on the compute device, in bytes (float32).

    Weights: θ0, the merged block and one teacher block, T task vectors, T coefficient tensors,
    their gradients and two Adam moments: ``(3 + 5T)`` block sizes. Activations of a training
    step on ``batch_size`` samples: hidden states and MLP activations kept for backward
    (``16 * hidden + 4 * intermediate`` floats per token) and three attention maps per head.
    """
    weights = (3 + 5 * num_tasks) * block_numel
    tokens = batch_size * seq_len
    activations = tokens * (16 * hidden + 4 * intermediate) + 3 * batch_size * heads * seq_len**2
    return 4 * (weights + activations)


def cache_placement(
    requested: str,
    device,
    cache_bytes: int,
    working_bytes: int,
    free_bytes: Optional[int],
    headroom: float = 0.9,
) -> str:
    """Where the cache goes: ``"device"``, ``"memory"`` or ``"disk"``.

    ``auto`` is ``device`` on a CUDA device whose free memory holds the cache plus a block's working
    set (within ``headroom``), else ``memory``. On a CPU device, ``device`` and ``memory`` are the
    same host memory (``memory``).

    Raises:
        ValueError: for an unknown placement, or ``device`` on a GPU whose free memory cannot hold
            the cache and a block's working set (naming both sizes).
    """
    if requested not in CACHE_PLACEMENTS:
        raise ValueError(
            f"invalid value {requested!r} for option `activation_cache`: {CACHE_PLACEMENTS}"
        )
    on_gpu = torch.device(device).type == "cuda"
    if requested == "disk":
        return "disk"
    if not on_gpu or requested == "memory":
        return "memory"
    fits = free_bytes is not None and cache_bytes + working_bytes <= headroom * free_bytes
    if requested == "device" and not fits:
        raise ValueError(
            f"option `activation_cache=device`: the cache ({cache_bytes / 2**30:.2f} GiB) and a "
            f"block's working set ({working_bytes / 2**30:.2f} GiB) do not fit into the device's "
            f"free memory ({(free_bytes or 0) / 2**30:.2f} GiB); use `auto` or `memory`"
        )
    return "device" if fits else "memory"


class _StagingRing:
    """Two staging buffers for one stream; a buffer is reused only after its last copy finished."""

    def __init__(self, pin: bool):
        self.pin = pin
        self.buffers: List[Optional[Tensor]] = [None, None]
        self.events: List[Optional[object]] = [None, None]
        self.turn = 0

    def next(self, rows: int, like: Tensor) -> Tensor:
        i, self.turn = self.turn, 1 - self.turn
        if self.events[i] is not None:
            self.events[i].synchronize()  # its previous non-blocking copy is complete
        buf = self.buffers[i]
        if buf is None or buf.shape[0] < rows:
            buf = torch.empty((rows,) + tuple(like.shape[1:]), dtype=like.dtype)
            self.buffers[i] = buf.pin_memory() if self.pin else buf
        self.current = i
        return self.buffers[i][:rows]

    def record(self, device) -> None:
        if torch.device(device).type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            self.events[self.current] = event


def staged_gather(source: Tensor, indices: Tensor, ring: _StagingRing, device) -> Tensor:
    """``source[indices]`` on ``device``: selected on the host into ``ring``'s next staging buffer,
    then copied with ``non_blocking=True`` (asynchronous from pinned memory on a GPU)."""
    buf = ring.next(len(indices), source)
    torch.index_select(source, 0, indices.cpu(), out=buf)
    out = buf.to(device, non_blocking=True)
    ring.record(device)
    if out.data_ptr() == buf.data_ptr():  # no copy was made (a host device): never hand out the
        out = out.clone()  # buffer itself, the gather after next reuses it
    return out


class DualStreamCache:
    """Student and teacher hidden states of ``N`` samples plus their task indices.

    Args:
        num_samples: ``N``.
        seq_len, hidden: per-sample hidden-state shape.
        task_ids: ``[N]`` task index of every sample.
        placement: ``"device"``, ``"memory"`` or ``"disk"`` (see :func:`cache_placement`).
        device: the compute device (where ``device`` places the streams and gathers deliver).
        directory: where the files go for ``disk``.
        masks: ``[N, seq]`` real-token masks of text samples (one per sample, shared by both
            streams; on the compute device, they are small); ``None`` for images.
    """

    def __init__(
        self,
        num_samples: int,
        seq_len: int,
        hidden: int,
        task_ids: Tensor,
        placement: str = "memory",
        device="cpu",
        directory: Optional[Path] = None,
        masks: Optional[Tensor] = None,
        dtype: torch.dtype = torch.float32,
    ):
        if masks is not None and tuple(masks.shape) != (num_samples, seq_len):
            raise ValueError(f"masks must have shape ({num_samples}, {seq_len}), got {masks.shape}")
        self.masks = None if masks is None else masks.to(torch.bool).to(device)
        if task_ids.shape != (num_samples,):
            raise ValueError(
                f"task_ids must have shape ({num_samples},), got {tuple(task_ids.shape)}"
            )
        if placement not in CACHE_PLACEMENTS[1:]:
            raise ValueError(f"invalid cache placement {placement!r}: {CACHE_PLACEMENTS[1:]}")
        self.shape = (num_samples, seq_len, hidden)
        self.dtype = dtype  # the compute dtype (float32 for a float32 pool, bfloat16 for ...)
        self.task_ids = task_ids.to(torch.long).cpu()
        self.placement = placement
        self.device = torch.device(device)
        self.files: List[Path] = []
        pin = self.device.type == "cuda"
        if placement == "disk":
            if directory is None:
                raise ValueError("DualStreamCache(placement='disk') needs a directory")
            directory = Path(directory)
            directory.mkdir(parents=True, exist_ok=True)
            self.student = self._file_tensor(directory / "student_stream.bin")
            self.teacher = self._file_tensor(directory / "teacher_stream.bin")
        elif placement == "device":
            self.student = torch.zeros(self.shape, dtype=dtype, device=self.device)
            self.teacher = torch.zeros(self.shape, dtype=dtype, device=self.device)
        else:
            self.student = torch.zeros(self.shape, dtype=dtype, pin_memory=pin)
            self.teacher = torch.zeros(self.shape, dtype=dtype, pin_memory=pin)
        self._staging: Dict[str, _StagingRing] = {s: _StagingRing(pin) for s in STREAMS}

    def _file_tensor(self, path: Path) -> Tensor:
        numel = self.shape[0] * self.shape[1] * self.shape[2]
        path.unlink(missing_ok=True)
        t = torch.from_file(str(path), shared=True, size=numel, dtype=self.dtype)
        self.files.append(path)
        return t.view(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return 2 * self.student.numel() * self.student.element_size()

    @property
    def staged(self) -> bool:
        """Whether gathers go through staging buffers (streams not on the compute device)."""
        return self.student.device != self.device

    def indices_of_task(self, task: int) -> Tensor:
        return torch.nonzero(self.task_ids == task, as_tuple=False).flatten()

    @staticmethod
    def chunks(indices: Tensor, batch_size: int) -> Iterator[Tensor]:
        for start in range(0, len(indices), batch_size):
            yield indices[start : start + batch_size]

    def gather(self, stream: str, indices: Tensor) -> Tensor:
        """Rows ``indices`` of ``stream`` on the compute device.

        On the device: an index select there. Otherwise the rows are selected into a (pinned, on a
        GPU) staging buffer and copied with ``non_blocking=True``.
        """
        source = getattr(self, stream)
        if not self.staged:
            return source.index_select(0, indices.to(source.device))
        return staged_gather(source, indices, self._staging[stream], self.device)

    def gather_mask(self, indices: Tensor) -> Optional[Tensor]:
        """Real-token masks ``[len(indices), seq]`` on the compute device (``None`` for images)."""
        if self.masks is None:
            return None
        return self.masks.index_select(0, indices.to(self.masks.device))

    def scatter(self, stream: str, indices: Tensor, values: Tensor) -> None:
        """Write ``values`` into rows ``indices`` of ``stream``."""
        target = getattr(self, stream)
        values = values.detach().to(target.device, target.dtype)
        target.index_copy_(0, indices.to(target.device), values)

    def close(self) -> None:
        """Drop the tensors and delete backing files, if any."""
        self.student = self.teacher = None
        self._staging = {}
        for path in self.files:
            Path(path).unlink(missing_ok=True)
        self.files = []


def stack_task_ids(counts: Sequence[int]) -> Tensor:
    """``[3, 2]`` → ``tensor([0, 0, 0, 1, 1])``."""
    return torch.cat([torch.full((c,), i, dtype=torch.long) for i, c in enumerate(counts)])
