"""The bounded buffer between the ingest and the pipeline, and how its clips become micro-batches.

[Note: live micro-batches]
Producers put complete clips (pipeline/ingest/clips.py) into a buffer of at most `capacity` clips. When it
is full, `block` makes the producer's Push handler wait, so the server stops reading that call and gRPC's
flow control (HTTP/2 windows) slows the client; `drop-oldest` drops the oldest queued clip instead and
counts its frames. Either way the memory the ingest holds is bounded: the buffer, the memory below and a
flow-control window per call.

The driver asks for micro-batch m (pipeline/ingest/source.py) and the buffer forms it from B clips:

  fresh      the oldest queued clip, then every later queued clip *compatible* with those chosen, up to
             B: of another stream, or of the same stream with first frames at least `gap` frames apart
             (frames of one stream close in time are near-positives, and as negatives of each other they
             poison a contrastive loss). Each clip is trained on as "fresh" in exactly one micro-batch; a
             stream's clips may be taken out of order by up to the buffer's span (a single stream's
             micro-batch takes clips 0, 5, 10, ... of the queue, the next 1, 6, 11, ...).
  negatives  the other B - F places, so that every clip has B - 1 others to be told apart from: clips
             compatible with every clip chosen, at random (seeded), from a bounded memory of the last
             `memory` clips trained on and from clips still queued (seen early; they stay queued and are
             fresh later). With several streams they are clips of other streams; with a single stream,
             clips of it far apart in time.

A micro-batch waits for B fresh clips up to `linger` seconds after its first one, then takes the
negatives it needs. When not enough compatible clips exist (a single stream's first micro-batches: its
memory is empty, and all it has is its own recent clips), it waits for more, and when more cannot come —
the buffer is full, no clip arrived for `linger` seconds, or the run is stopping — the gap is halved until
the micro-batch fills (never below distinct clips). With one stream at T = 8, B = 16 and the default gap of
4T frames, full-gap micro-batches need about 16 x 32 = 512 frames of memory: the default memory (256 clips
= 1 800 frames) holds that, so after warm-up every micro-batch honours the gap. Measured
(tests/test_ingest.py, one stream of 3 000 frames, a 64-clip buffer): 38 micro-batches of about 11 fresh
clips each; the first 3 relaxed the gap (to 14 frames at the least), every later one kept it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.ingest.clips import Clip

logger = logging.getLogger(__name__)

WHEN_FULL = ("block", "drop-oldest")
POLL_S = 0.1  # a waiting producer or driver looks at its cancel / stop flag this often


@dataclass(frozen=True)
class Formed:
    """The clips of one micro-batch, fresh ones first."""

    clips: tuple[Clip, ...]
    fresh: int  # the first `fresh` clips are trained on for the first time
    relaxed_gap: int  # the gap the negatives honour (below the configured gap: a warm-up or a stall)


class ClipBuffer:
    """Bounded FIFO of complete clips (many producers) and the memory of trained clips (the driver)."""

    def __init__(self, clips_per_batch: int, capacity: int = 64, when_full: str = "block", memory: int = 256,
                 gap: int = 32, linger: float = 0.5, seed: int = 0) -> None:
        if when_full not in WHEN_FULL:
            raise ValueError(f"--when-full must be one of {list(WHEN_FULL)} (got {when_full!r})")
        if capacity < 1 or memory < 0 or gap < 1 or linger < 0:
            raise ValueError(f"buffer capacity >= 1, memory >= 0, gap >= 1, linger >= 0 (got {capacity}, "
                             f"{memory}, {gap}, {linger})")
        self.B, self.capacity, self.when_full, self.gap, self.linger = (clips_per_batch, capacity, when_full,
                                                                       gap, linger)
        self.seed = seed
        self._queue: collections.deque[Clip] = collections.deque()
        self._memory: collections.deque[Clip] = collections.deque(maxlen=memory)
        self._cond = threading.Condition()
        self._last_put = time.monotonic()
        self.dropped_clips = 0
        self.dropped_frames = 0  # frames of dropped clips that are in no other clip
        self.bytes = 0  # pixel bytes queued

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, clip: Clip, cancelled: Callable[[], bool] = lambda: False) -> bool:
        """Queue a clip; when full, wait (block) or drop the oldest (drop-oldest). False: cancelled while
        waiting, the clip was not queued."""
        with self._cond:
            while len(self._queue) >= self.capacity:
                if self.when_full == "drop-oldest":
                    old = self._queue.popleft()
                    self.bytes -= old.nbytes
                    self.dropped_clips += 1
                    self.dropped_frames += len(old.frames) - 1  # its first frame ends the previous clip
                    logger.warning("buffer full: dropped the clip of stream %r at frame %d (%d clips dropped)",
                                   old.stream, old.start, self.dropped_clips)
                    continue
                if cancelled():
                    return False
                self._cond.wait(POLL_S)
            self._queue.append(clip)
            self.bytes += clip.nbytes
            self._last_put = time.monotonic()
            self._cond.notify_all()
            return True

    def form(self, m: int, stopping: Callable[[], bool] = lambda: False) -> Formed | None:
        """The clips of micro-batch m ([Note: live micro-batches]); waits for them. None: the run is
        stopping and no micro-batch can be formed from what there is."""
        waited_since: float | None = None
        with self._cond:
            while True:
                fresh = self._fresh()
                stop = stopping()
                if fresh or stop:
                    now = time.monotonic()
                    waited_since = waited_since if waited_since is not None else now
                    if len(fresh) == self.B or stop or now - waited_since >= self.linger:
                        stuck = (stop or len(self._queue) >= self.capacity
                                 or now - self._last_put >= self.linger)
                        formed = self._fill(m, fresh, relax=stuck)
                        if formed is not None:
                            self._take(formed)
                            return formed
                        if stop:
                            return None
                self._cond.wait(POLL_S)

    def _fresh(self) -> list[Clip]:
        fresh: list[Clip] = []
        for clip in self._queue:  # the oldest is always taken: no clip waits forever
            if all(_apart(clip, other, self.gap) for other in fresh):
                fresh.append(clip)
                if len(fresh) == self.B:
                    break
        return fresh

    def _fill(self, m: int, fresh: list[Clip], relax: bool) -> Formed | None:
        """Fresh clips plus compatible negatives; with `relax`, a halved gap until they fill."""
        chosen_ids = {id(c) for c in fresh}
        candidates = [c for c in (*self._memory, *self._queue) if id(c) not in chosen_ids]
        order = np.random.default_rng([self.seed, m]).permutation(len(candidates))
        gap = self.gap
        while True:
            chosen = list(fresh)
            for i in order:
                if len(chosen) == self.B:
                    break
                c = candidates[i]
                if all(_apart(c, o, gap) for o in chosen):
                    chosen.append(c)
            if len(chosen) == self.B:
                if gap < self.gap:
                    logger.info("micro-batch %d: negatives at a gap of %d frames (not %d): too few clips far "
                                "apart yet", m, gap, self.gap)
                return Formed(tuple(chosen), len(fresh), gap)
            if not relax or gap == 1:
                return None
            gap = max(1, gap // 2)

    def _take(self, formed: Formed) -> None:
        """Fresh clips leave the queue for the memory; producers waiting for room are woken."""
        for clip in formed.clips[:formed.fresh]:
            self._queue.remove(clip)
            self.bytes -= clip.nbytes
            self._memory.append(clip)
        self._cond.notify_all()


def _apart(a: Clip, b: Clip, gap: int) -> bool:
    """Whether two clips may share a micro-batch: other streams, or first frames `gap` or more apart."""
    return a.stream != b.stream or abs(a.start - b.start) >= gap
