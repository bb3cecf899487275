"""Moving MNIST: one digit bouncing in a 64x64 frame, made from an MNIST .npz (x_train, y_train, x_test, y_test).

Spec: `moving-mnist:PATH[,key=value...]` (the path may not contain commas). Options:
  sequences  train sequences                 (default 2000)
  probe      probe sequences                 (default 500)
  frames     frames per sequence             (default 20, as in the usual Moving MNIST)
  seed       generator seed, >= 0            (default 0)

The train split cuts its digits from x_train, the probe split from x_test: the probe's digits are ones no
training sequence showed. Each digit keeps a constant velocity of 1-3 px/frame (on the 64x64 canvas) and
reflects off the walls, so it is always wholly visible; the label of every frame is the digit.
"""

from __future__ import annotations

import zipfile

import numpy as np
import torch

from pipeline.errors import DataError
from pipeline.sources.budget import check, frames_bytes
from pipeline.sources.options import OptionSpec, parse_options
from pipeline.sources.videos import Videos, from_array, open_npz

CANVAS = 64  # the usual Moving MNIST frame, before resizing to --size
REQUIRED = ("x_train", "y_train", "x_test", "y_test")

_OPTIONS: OptionSpec = {
    "sequences": (int, 1, 1_000_000),
    "probe": (int, 1, 1_000_000),
    "frames": (int, 2, 100_000),
    "seed": (int, 0, 2**63 - 1),
}
_SPLIT_ARRAYS = {"train": ("x_train", "y_train", 0), "probe": ("x_test", "y_test", 1)}
# Sequences rendered and resized at once: the 64x64 canvases of all 2000 x 20 frames would be 164 MB as
# uint8 and 655 MB as from_array's float32 intermediate; chunking keeps the peak near the final tensor.
_CHUNK = 250


def moving_mnist_videos(spec: str, size: int, split: str, budget: float | None = None) -> Videos:
    """Generate the split's sequences from the archive at the spec's path; deterministic in (spec, size, split)."""
    if split not in _SPLIT_ARRAYS:
        raise ValueError(f"split must be 'train' or 'probe' (got {split!r})")
    path, _, options = spec.partition(",")
    path = path.strip()
    opts = parse_options(options, _OPTIONS, "moving-mnist")
    n = int(opts.get("sequences", 2000)) if split == "train" else int(opts.get("probe", 500))
    length = int(opts.get("frames", 20))
    seed = int(opts.get("seed", 0))
    canvases = _CHUNK * length * CANVAS * CANVAS * 5  # a chunk's uint8 canvases and their float32 copy
    check(f"moving-mnist:{spec}", frames_bytes(n, length, 1, size) + canvases, budget,
          f"{n} sequences x {length} frames at --size {size}")
    x_key, y_key, stream = _SPLIT_ARRAYS[split]
    digits, digit_labels = _load_digits(path, x_key, y_key)

    rng = np.random.default_rng([seed, stream])
    pick = rng.choice(len(digits), size=n, replace=n > len(digits))
    h, w = digits.shape[1:]
    # Top-left corner: a straight path at 1-3 px/frame folded into [0, CANVAS - h] x [0, CANVAS - w].
    speed = rng.uniform(1.0, 3.0, n)
    heading = rng.uniform(0, 2 * np.pi, n)
    t = np.arange(length)[None, :]
    top = _bounce(rng.uniform(0, CANVAS - h, n)[:, None] + (speed * np.sin(heading))[:, None] * t, CANVAS - h)
    left = _bounce(rng.uniform(0, CANVAS - w, n)[:, None] + (speed * np.cos(heading))[:, None] * t, CANVAS - w)
    top, left = np.rint(top).astype(np.intp), np.rint(left).astype(np.intp)

    labels = np.repeat(digit_labels[pick].astype(np.int64)[:, None], length, axis=1)
    name = f"moving-mnist:{spec}"
    out = torch.empty((n, length, 1, size, size), dtype=torch.float32)
    for lo in range(0, n, _CHUNK):
        hi = min(lo + _CHUNK, n)
        canvas = _paste(digits[pick[lo:hi]], top[lo:hi], left[lo:hi])
        out[lo:hi] = from_array(name, canvas, labels[lo:hi], False, size).frames
    return Videos(out, torch.from_numpy(labels), False, name)


def _bounce(x: np.ndarray, span: int) -> np.ndarray:
    """Fold positions into [0, span], reflecting at both walls (a triangle wave of period 2 * span)."""
    if span == 0:
        return np.zeros_like(x)
    y = np.mod(x, 2 * span)
    return np.where(y > span, 2 * span - y, y)


def _paste(digits: np.ndarray, top: np.ndarray, left: np.ndarray) -> np.ndarray:
    """(n, h, w) digits at per-frame corners (n, L) -> (n, L, CANVAS, CANVAS) uint8.

    A plain loop of slice copies: measured ~8x faster than one fancy-index scatter of the same pixels
    (7 ms vs 55 ms for 250 x 20 frames), since each copy is a few contiguous rows and needs no index arrays.
    """
    n, h, w = digits.shape
    canvas = np.zeros((n, top.shape[1], CANVAS, CANVAS), np.uint8)
    for i in range(n):
        for j, (y, x) in enumerate(zip(top[i].tolist(), left[i].tolist())):
            canvas[i, j, y:y + h, x:x + w] = digits[i]
    return canvas


def _load_digits(path: str, x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read and check one split's digits; every problem raises DataError naming the file."""
    archive = open_npz(path, "moving-mnist")
    with archive:
        found = sorted(archive.files)
        missing = [k for k in REQUIRED if k not in found]
        if missing:
            # All four are required even though a split reads two: a file without its test digits should
            # fail before training, not at the probe afterwards.
            raise DataError(f"{path}: missing arrays {missing} for Moving MNIST (found {found})")
        try:
            x, y = archive[x_key], archive[y_key]
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise DataError(f"{path}: cannot read '{x_key}'/'{y_key}' ({e})") from None
    if x.ndim != 3:
        raise DataError(f"{path}: '{x_key}' must have shape (N, H, W), got {x.shape}")
    if x.dtype != np.uint8:
        raise DataError(f"{path}: '{x_key}' must be uint8 (got {x.dtype})")
    n, h, w = x.shape
    if n < 1:
        raise DataError(f"{path}: '{x_key}' holds no digits")
    if not (1 <= h <= CANVAS and 1 <= w <= CANVAS):
        raise DataError(f"{path}: '{x_key}' digits of {h}x{w} do not fit the {CANVAS}x{CANVAS} canvas")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: '{y_key}' must be integers (got {y.dtype})")
    if y.shape != (n,):
        raise DataError(f"{path}: '{y_key}' has shape {y.shape}; expected ({n},) to match '{x_key}' {x.shape}")
    if (y < 0).any():
        raise DataError(f"{path}: '{y_key}' must be >= 0 (min {y.min()})")
    return x, y
