"""Host memory: give freed model-sized memory back to the operating system.

glibc serves allocations below its mmap threshold from the C heap and keeps freed heap memory for
reuse; the threshold grows (up to 32 MiB) each time a large mmapped block is freed. A model loaded
tensor by tensor (every ViT tensor is below 32 MiB) therefore stays in the process's resident set
after it is freed, while the next large tensors (e.g. a ``[K, *shape]`` stack of task vectors) are
mmapped beside it. Measured on the ViT-B/32-sized pool (``benchmarks/real_scale.py``): StatsMerging's
peak RSS 4.50-4.68 GiB with ~0.4 GiB of freed but resident heap, 4.31 GiB when that memory is returned.
:func:`release_free_memory` returns it (``malloc_trim``) at the points where a model-sized object has
just been freed; it is a no-op where the C library has no ``malloc_trim`` (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from typing import Optional


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[ctypes._CFuncPtr]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory(collect: bool = True) -> bool:
    """Collect garbage (``collect``), then return the C heap's free pages to the OS; ``True`` if the
    C library could (glibc ``malloc_trim(0)``)."""
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
