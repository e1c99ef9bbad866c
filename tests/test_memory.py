"""``release_free_memory``: freed heap memory leaves the resident set (glibc), so a freed task model
does not count toward the next phase's peak."""

from __future__ import annotations

import platform

import pytest
import torch

from statsmerge_plugin.memory import release_free_memory


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_heap_memory_leaves_the_resident_set():
    # 64 KiB tensors come from the C heap (below glibc's mmap threshold); freeing every other one
    # leaves holes that the heap keeps resident, as a freed model's tensors are kept
    tensors = [torch.ones(16 * 1024) for _ in range(4096)]  # 256 MiB, every page touched
    del tensors[::2]
    held = resident_bytes()
    assert release_free_memory() is True
    released = held - resident_bytes()
    assert released > 64 * 2**20, f"only {released / 2**20:.0f} MiB of ~128 MiB freed left the RSS"
    assert all(float(t[0]) == 1.0 for t in tensors)  # the live half is untouched
