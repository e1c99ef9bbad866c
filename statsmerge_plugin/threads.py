"""How many CPU threads torch uses in this package's methods.

torch's default is one thread per core it sees. On a small shared machine (two cores, another job
beside ours) that oversubscribes the CPU and both jobs slow down by far more than 2x. The methods of
this package therefore choose the thread count at the start of ``run()``:

1. ``STATSMERGE_NUM_THREADS`` (a positive integer), if set;
2. else ``OMP_NUM_THREADS`` (a positive integer), if set, as torch itself would;
3. else, on a machine with few cores (at most :data:`FEW_CORES` usable ones; usable cores honour
   the process's CPU affinity), ``min(2, usable cores)``;
4. else nothing: torch keeps its own default (one thread per core) on a GPU server or a
   workstation, where capping FusionBench's evaluation and data loading at two threads would only
   slow it down.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Optional

log = logging.getLogger(__name__)

ENV_VAR = "STATSMERGE_NUM_THREADS"
DEFAULT_MAX_THREADS = 2
#: machines with at most this many usable cores get the cap of rule 3 (module docstring)
FEW_CORES = 4


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def _positive_int(name: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(
            f"environment variable {name}={value!r}: expected a positive integer (number of CPU "
            "threads torch may use)"
        )
    return n


def torch_num_threads(
    environ: Optional[Mapping[str, str]] = None, cores: Optional[int] = None
) -> Optional[int]:
    """The thread count for torch (see the module docstring for the order of precedence), or
    ``None`` to keep torch's default. ``cores``: the usable cores (default :func:`usable_cores`).

    Raises:
        ValueError: naming the variable, when ``STATSMERGE_NUM_THREADS`` or ``OMP_NUM_THREADS`` is
            set to anything but a positive integer.
    """
    environ = os.environ if environ is None else environ
    for name in (ENV_VAR, "OMP_NUM_THREADS"):
        value = environ.get(name, "").strip()
        if value:
            return _positive_int(name, value)
    cores = usable_cores() if cores is None else cores
    return min(DEFAULT_MAX_THREADS, cores) if cores <= FEW_CORES else None


def configure_torch_threads() -> int:
    """Set ``torch.set_num_threads`` to :func:`torch_num_threads` (unless that keeps torch's
    default) and return the thread count torch then uses."""
    import torch

    n = torch_num_threads()
    if n is None:
        return torch.get_num_threads()
    if torch.get_num_threads() != n:
        log.info(f"torch CPU threads: {torch.get_num_threads()} -> {n} (set {ENV_VAR} to change)")
        torch.set_num_threads(n)
    return n
