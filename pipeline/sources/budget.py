"""The memory budget of data held in memory: checked before anything is allocated.

A 522 KB compressed archive of zeros expands to gigabytes, `synthetic:sequences=1000000` asks for 30 GiB and
`--size 20000` for terabytes; each would fail late (or take the machine down) in the middle of loading. The
in-memory loaders (synthetic, moving-mnist, npz) first estimate the peak they need from sizes they can read
without loading (options, array headers) and refuse, with the numbers, what exceeds `--memory-budget`
(default: half of this machine's memory). Streaming sources (video:, parquet:) keep a bounded cache and
are not checked here.
"""

from __future__ import annotations

import math
import os
import zipfile

import numpy as np

from pipeline.errors import DataError

GIB = 1 << 30


def machine_memory() -> int:
    """Bytes of physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget() -> float:
    """GiB: half of this machine's memory."""
    return machine_memory() / 2 / GIB


def check(name: str, need: int, budget_gib: float | None, what: str) -> None:
    """Refuse `name` when it needs more than the budget (None: the default budget)."""
    budget = (budget_gib if budget_gib is not None else default_budget()) * GIB
    if need > budget:
        raise DataError(f"{name}: loading it needs about {need / GIB:.1f} GiB of memory ({what}), more than "
                        f"--memory-budget {budget / GIB:.1f} GiB")


def frames_bytes(n: int, length: int, channels: int, size: int) -> int:
    """The float32 tensor of n sequences of `length` frames at size x size: what every loader ends with."""
    return n * length * channels * size * size * 4


def npy_header(archive: str, member: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype of an array in an .npz archive, read from its header without decompressing it; None
    when the member is absent or its header unreadable (the loader then says what is wrong)."""
    try:
        with zipfile.ZipFile(archive) as z, z.open(f"{member}.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            return tuple(int(n) for n in shape), dtype
    except (KeyError, OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None


def npz_frames_bytes(shape: tuple[int, ...], dtype: np.dtype, size: int) -> int:
    """Peak of loading frames (N, L, H, W[, C]): the array, its float32 copy at full size, and the result."""
    if len(shape) < 4:
        return 0
    n, length = shape[:2]
    channels = shape[4] if len(shape) == 5 else 1
    elements = math.prod(shape)
    return elements * dtype.itemsize + elements * 4 + frames_bytes(n, length, channels, size)
