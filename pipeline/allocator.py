"""The C allocator of a process that steps layers on the cpu: freed activations stay for the next step.

A step allocates and frees the same large tensors every time (the activations, their gradients: tens of MB
at B = 16). With glibc's defaults, blocks above its mmap threshold are handed back to the kernel when freed
and the heap's top is trimmed, so every step took its activations' pages from the kernel again: about
10 000 page faults and a quarter of a stage's step time on the bench's network (PERFLOG, 2026-11-30 M5).
`keep_freed_memory` raises both thresholds, so freed blocks stay in the process's heap and the next step
reuses them. The cost is that a process keeps the memory of its largest step between steps, which a stage
needs again on its next step anyway. Where the C library is not glibc, nothing changes.

The thresholds cover one arena: the main one, where the main thread allocates. A thread of its own (the
shm loop's concurrency group, a compiled graph's execution loop) allocates from one of glibc's per-thread
arenas, made of 64 MB heaps, and glibc unmaps such a heap as soon as all of it is free, whatever the trim
threshold. Whether a step's tensors leave a heap entirely free at its end depends on where they fell, so
in some runs the step took its activations' pages from the kernel again every time: 10 000-18 000 page
faults and 1.3-1.5x its time, for the whole run (PERFLOG.md, M12). `WORKER_ENV` gives a stage's
process one arena from its start, so every thread's allocations follow the thresholds above.

`WORKER_ENV` also asks glibc (2.35 and later) to back the heap with transparent huge pages where the kernel
gives them on request (`/sys/kernel/mm/transparent_hugepage/enabled`: madvise, a common default): a step's
activations then span a few hundred 2 MiB pages rather than tens of thousands of 4 KiB ones, and the bench's
first stage steps in 0.96x the time alone, 0.97x beside the second stage (`python -m pipeline.bench.hugepages`,
PERFLOG.md M19). A stage actor's resident memory during a run stays what it was without (M19).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import platform

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
MMAP_THRESHOLD = 128 << 20  # blocks up to this size come from the heap, not from mmap
TRIM_THRESHOLD = 1 << 30  # the heap's free top is returned to the kernel only beyond this
# The environment of a process that steps layers (a Ray actor's runtime_env env_vars): read by glibc at
# the process's start, ignored by other C libraries.
HUGE_PAGES = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
WORKER_ENV = {"MALLOC_ARENA_MAX": "1", **HUGE_PAGES}


@functools.cache  # once per process
def keep_freed_memory() -> bool:
    """Set this process's allocator to keep freed memory for reuse (module docstring); True where it did."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        logger.debug("mallopt refused the thresholds: the allocator keeps its defaults")
    return ok
