"""Handing freed heap memory back to the operating system (glibc's malloc_trim; a no-op elsewhere), and how much
the system has left (`available_memory`: whether a server can afford a second copy of its weights).

glibc keeps memory freed by large tensors in its heap when it raised its mmap threshold (it does after large blocks
are freed), so the resident set stays at its high-water mark: after a full-precision checkpoint was read and
quantized (the fp32 weights are gone, their pages are not: SmolLM2 int8 1,639 -> 908 MiB after a trim), and in a
server that runs passes of ever new shapes (~100 MiB creep per few thousand requests without it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable


def _malloc_trim() -> Callable[[], object] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None
    return (lambda: libc.malloc_trim(0)) if hasattr(libc, "malloc_trim") else None


_trim = _malloc_trim()


def available_memory() -> int | None:
    """Bytes the system can still give out without swapping (Linux's MemAvailable: free memory plus the page cache
    it can drop), or None where /proc/meminfo does not tell."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def release_free_memory(collect: bool = False) -> None:
    """Return the heap's free pages to the OS (after `gc.collect()` when `collect`); cheap when little is free."""
    if collect:
        gc.collect()
    if _trim is not None:
        _trim()
