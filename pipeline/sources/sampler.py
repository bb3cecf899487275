"""The clip sampler: micro-batch m is a pure function of (seed, m), so any position replays exactly.

Recovery relies on this: a source restarted at micro-batch m+1 yields exactly what an uninterrupted
source would have yielded there, with no state to save but the number m.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.sources.source import MicroBatch
from pipeline.sources.videos import Videos


def clip_span(clips: int, clip_len: int, stride: int) -> int:
    """Frames one clip spans; refuses a micro-batch shape no objective can learn from."""
    if clips < 2:
        raise ConfigError(f"--clips must be >= 2: negatives come from other clips (got {clips})")
    if clip_len < 2:
        raise ConfigError(f"--clip-len must be >= 2: positives are frames of one clip (got {clip_len})")
    if stride < 1:
        raise ConfigError(f"--stride must be >= 1 (got {stride})")
    return (clip_len - 1) * stride + 1


class ClipSampler:
    """A `Source` over videos in memory: cuts micro-batches of `clips` clips of `clip_len` frames from
    `videos`, `stride` frames apart.

    The stride is the temporal distance between a clip's neighbouring frames (1: consecutive frames):
    larger strides give positives that differ more (a digit moved farther, an object turned farther).

    The clips of one micro-batch come from distinct sequences (so there must be at least `clips`): negatives
    drawn from the same sequence as the anchor poison contrastive objectives.
    """

    def __init__(self, videos: Videos, clips: int, clip_len: int, seed: int, stride: int = 1) -> None:
        length = videos.frames.shape[1]
        span = clip_span(clips, clip_len, stride)
        sequences = videos.frames.shape[0]
        if clips > sequences:
            raise ConfigError(f"--clips {clips} is more than the {sequences} sequences of {videos.name}: the clips "
                              f"of a micro-batch come from distinct sequences (negatives from the clip's own "
                              f"sequence poison contrastive objectives)")
        if span > length:
            raise ConfigError(f"--clip-len {clip_len} at --stride {stride} spans {span} frames, more than the "
                             f"sequences of {videos.name} ({length} frames)")
        self.videos, self.clips, self.clip_len, self.seed, self.stride = videos, clips, clip_len, seed, stride
        self.span = span
        self.name, self.frame_shape = videos.name, videos.frame_shape

    def batch(self, m: int) -> MicroBatch:
        if m < 0:
            raise ValueError(f"micro-batch index must be >= 0 (got {m})")
        rng = np.random.default_rng([self.seed, m])
        n, length = self.videos.frames.shape[:2]
        seqs = rng.choice(n, size=self.clips, replace=False)
        last_start = length if self.videos.wrap else length - self.span + 1
        starts = rng.integers(0, last_start, size=self.clips)
        idx = (starts[:, None] + self.stride * np.arange(self.clip_len)[None, :]) % length
        s = torch.from_numpy(seqs)[:, None]
        i = torch.from_numpy(idx)
        return MicroBatch(m, self.videos.frames[s, i].contiguous(), tuple(int(q) for q in seqs),
                          tuple(int(q) for q in starts), self.videos.labels[s, i])

    def stream(self, start: int = 0, stop: int | None = None) -> Iterator[MicroBatch]:
        """Micro-batches start, start+1, ... (up to stop, exclusive, or forever)."""
        m = start
        while stop is None or m < stop:
            yield self.batch(m)
            m += 1
