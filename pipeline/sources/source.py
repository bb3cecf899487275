"""The contract of a source: where micro-batches come from.

An engine asks a source for micro-batch m by number, in order, and may ask again for the same m after a
failure ([Note: recovery] in pipeline/engines/recovery.py): `batch(m)` must return the same clips every
time. The samplers over videos held in memory (pipeline/sources/sampler.py) and the sources that stream
video files and prepared Parquet datasets (pipeline/sources/streaming.py) make micro-batch m a pure
function of (seed, m); a live stream would keep what it needs to replay (a write-ahead log) and plug in
behind the same three names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


@dataclass(frozen=True)
class MicroBatch:
    """B clips x T frames: the unit of work that travels through the pipeline."""

    index: int  # micro-batch number m
    frames: Tensor  # (B, T, C, H, W) float32
    sequences: tuple[int, ...]  # which sequence each clip was cut from
    starts: tuple[int, ...]  # first frame index of each clip
    labels: Tensor  # (B, T) int64, evaluation only


class Source(Protocol):
    """Micro-batches by number, replayable."""

    name: str  # where the frames come from, for messages and run records
    frame_shape: tuple[int, int, int]  # one frame: (C, H, W)

    def batch(self, m: int) -> MicroBatch:
        """Micro-batch m: the same clips whenever it is asked for."""
        ...
