"""Videos in memory: N sequences of L frames as one tensor, and the helpers every loader shares."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.errors import DataError


@dataclass(frozen=True)
class Videos:
    """N sequences of L frames, resized and scaled to [0, 1]."""

    frames: Tensor  # (N, L, C, H, W) float32 in [0, 1]
    labels: Tensor  # (N, L) int64, used for evaluation only
    wrap: bool  # True for turntables: frame L-1 neighbours frame 0
    name: str  # where they came from, for messages and run records

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        c, h, w = self.frames.shape[2:]
        return (int(c), int(h), int(w))


def open_npz(path: str, kind: str) -> np.lib.npyio.NpzFile:
    """np.load an .npz archive for the `kind:PATH` data spec; every problem raises DataError naming the file."""
    if not path:
        raise DataError(f"{kind}: no path given (use {kind}:PATH)")
    if os.path.isdir(path):
        raise DataError(f"{path} is a directory, not an .npz archive")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable .npz archive ({e})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: holds a single .npy array, not an .npz archive of named arrays")
    return archive


def from_array(name: str, frames: np.ndarray, labels: np.ndarray, wrap: bool, size: int) -> Videos:
    """(N, L, H, W[, C]) frames, uint8 or float in [0, 1], and (N, L) labels -> Videos, resized to size."""
    if frames.ndim == 4:
        frames = frames[..., None]
    n, length, h, w, c = frames.shape
    assert labels.shape == (n, length), f"labels {labels.shape} do not match frames {frames.shape}"
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 1, 4, 2, 3).reshape(n * length, c, h, w)
    x = x.float().div_(255.0) if frames.dtype == np.uint8 else x.float()
    if (h, w) != (size, size):
        # Area interpolation averages pixels when shrinking, so small frames keep their content.
        shrink = min(h, w) >= size
        x = F.interpolate(x, size=(size, size), mode="area" if shrink else "bilinear",
                          align_corners=None if shrink else False)
    return Videos(x.reshape(n, length, c, size, size).contiguous(), torch.from_numpy(labels).long(), wrap, name)
