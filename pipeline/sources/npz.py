"""npz archives: sequence archives (`frames`) and turntable archives (`images`)."""

from __future__ import annotations

import zipfile

import numpy as np

from pipeline.errors import DataError
from pipeline.sources.budget import check, npy_header, npz_frames_bytes
from pipeline.sources.videos import Videos, from_array, open_npz


def npz_videos(path: str, size: int, budget: float | None = None) -> Videos:
    """Read a sequence archive or a turntable archive; every problem raises DataError naming the file.

    sequence archive:  frames (N_seq, T, H, W[, C]) uint8, labels (N_seq,) or (N_seq, T)
    turntable archive: images (O, V, H, W[, C]) uint8, labels (O, V); view V-1 neighbours view 0
    Frames may also be float in [0, 1]. `budget`: GiB the loading may take ([Note] in budget.py).
    """
    archive = open_npz(path, "npz")
    with archive:
        keys = set(archive.files)
        if "frames" in keys:
            key, wrap = "frames", False
        elif "images" in keys:
            key, wrap = "images", True
        else:
            raise DataError(f"{path}: expected an array named 'frames' (sequences) or 'images' (turntable), "
                            f"found {sorted(keys)}")
        header = npy_header(path, key)
        if header is not None:
            shape, dtype = header
            check(path, npz_frames_bytes(shape, dtype, size), budget, f"'{key}' {shape} {dtype} at --size {size}")
        if "labels" not in keys:
            raise DataError(f"{path}: missing the array 'labels' (found {sorted(keys)})")
        try:
            frames, labels = archive[key], archive["labels"]
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            # Object arrays (pickles are refused) and corrupt members end up here.
            raise DataError(f"{path}: cannot read '{key}' or 'labels' ({e})") from None
    if frames.ndim not in (4, 5):
        raise DataError(f"{path}: '{key}' must have rank 4 (N, T, H, W) or 5 (N, T, H, W, C), "
                        f"got shape {frames.shape}")
    if frames.ndim == 5 and frames.shape[-1] not in (1, 3):
        raise DataError(f"{path}: '{key}' has {frames.shape[-1]} channels in its last axis; expected 1 or 3")
    if frames.dtype != np.uint8 and not np.issubdtype(frames.dtype, np.floating):
        raise DataError(f"{path}: '{key}' must be uint8, or float in [0, 1] (got {frames.dtype})")
    if np.issubdtype(frames.dtype, np.floating):
        if not np.isfinite(frames).all():
            raise DataError(f"{path}: '{key}' contains NaN or inf")
        if frames.min() < 0 or frames.max() > 1:
            raise DataError(f"{path}: float '{key}' must lie in [0, 1] (got [{frames.min()}, {frames.max()}])")
    n, length = frames.shape[:2]
    if min(frames.shape[2:4]) < 1:
        raise DataError(f"{path}: frames of size {frames.shape[2]}x{frames.shape[3]} are empty")
    if n < 1:
        raise DataError(f"{path}: '{key}' holds no sequences")
    if length < 2:
        raise DataError(f"{path}: sequences must have at least 2 frames (got {length})")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: 'labels' must be integers (got {labels.dtype})")
    if labels.shape == (n,):
        labels = np.repeat(labels[:, None], length, axis=1)
    if labels.shape != (n, length):
        raise DataError(f"{path}: 'labels' has shape {labels.shape}; expected ({n},) or ({n}, {length}) "
                        f"to match '{key}' {frames.shape}")
    if (labels < 0).any():
        raise DataError(f"{path}: 'labels' must be >= 0 (min {labels.min()})")
    return from_array(path, frames, labels.astype(np.int64), wrap, size)
