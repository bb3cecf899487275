"""Sources that stream clips from storage instead of holding videos in memory: the `video:` files decoded
on the fly and the `parquet:` datasets `lamina prepare` writes. One sampler and one cache serve both.

[Note: streaming clips]
The guarantees are the in-memory sampler's (pipeline/sources/sampler.py), over videos of any length:

  which clips   micro-batch m draws its B videos and each clip's first frame from a generator seeded with
                (seed, m) alone: the B videos are distinct whenever the dataset has B videos long enough
                for a clip (videos shorter than a clip are never drawn), every such video equally likely,
                and every first frame of a video equally likely. Nothing else goes in, so a resume or a
                recovery that asks for m again gets the same clips.
  which frames  a video's frames live in *segments* (a Parquet row group; a stretch of a video file that
                decoding can start at); a clip reads the segments its frames fall in. The pixels of a
                frame never depend on which segment, cache state or thread delivered it.
  memory        decoded segments are kept in an LRU cache of `cache` MB. While micro-batch m is assembled,
                the segments of m+1 .. m+readahead are fetched in the background by `workers` threads, as
                far as the cache has room: a dataset larger than memory streams through a bounded window
                and never lands in memory whole. The bound is max(cache, the segments one micro-batch
                needs): the segments of the micro-batch being assembled are never evicted.

    batch(m):   plan(m) -> B (video, first frame) -> segments ──┬─ cached: used as they are
                                                                 └─ missing: read by a worker now
                plan(m+1 .. m+readahead) -> segments -> read by workers in the background

[Note: probing streamed data]
The probe (pipeline/evaluation/probe.py) fits on frames held in memory, as `Videos`: N sequences of L
frames. A streamed dataset may not fit, and its videos differ in length, so `load_videos` of a `video:` or
`parquet:` spec gives a bounded sample: `probe_frames` frames (default 16) spread evenly over each video,
first and last included, of at most `probe_videos` videos (default 500; a fixed random subset when there
are more). Memory: probe_videos x probe_frames frames as float32 (500 x 16 RGB 32x32 frames: 98 MB). The
same sample serves both splits: like an npz archive, the probe's split picks the labelled frames within it
(`--probe-views 0,4,8,12`: those positions of every video; `--probe-fraction`: whole videos).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.sources.options import OptionSpec
from pipeline.sources.sampler import clip_span
from pipeline.sources.source import MicroBatch
from pipeline.sources.videos import Videos

logger = logging.getLogger(__name__)

Key = Hashable  # names a segment within its reader


@dataclass(frozen=True)
class Segment:
    """Consecutive frames of one place in storage, decoded."""

    frames: np.ndarray  # (n, H, W, C) uint8
    labels: np.ndarray | None = None  # (n,) int64 per-frame label ids (a label column); None: the video's

    @property
    def nbytes(self) -> int:
        return int(self.frames.nbytes + (self.labels.nbytes if self.labels is not None else 0))


@dataclass(frozen=True)
class Piece:
    """Part of a clip's frames: rows [lo, hi) of segment `key`."""

    key: Key
    lo: int
    hi: int


# The options of every streamed spec (video:, parquet:): damaged input, the cache, read-ahead, decoding
# threads, and the probe's bounded sample ([Note: probing streamed data]).
STREAM_OPTIONS: OptionSpec = {
    "strict": (int, 0, 1),
    "cache": (float, 0, 1 << 20),
    "readahead": (int, 0, 64),
    "workers": (int, 1, 256),
    "probe_videos": (int, 1, 1_000_000),
    "probe_frames": (int, 1, 100_000),
}


@dataclass(frozen=True)
class StreamOptions:
    strict: bool = False
    cache_mb: float = 512
    readahead: int = 2
    workers: int = 0  # 0: the machine's cores
    probe_videos: int = 500
    probe_frames: int = 16

    @staticmethod
    def fields(o: dict[str, Any]) -> dict[str, Any]:
        """The StreamOptions fields from parsed options (parse_options over STREAM_OPTIONS), defaults filled."""
        return {"strict": bool(o.get("strict", 0)), "cache_mb": float(o.get("cache", 512)),
                "readahead": int(o.get("readahead", 2)), "workers": int(o.get("workers", 0)),
                "probe_videos": int(o.get("probe_videos", 500)), "probe_frames": int(o.get("probe_frames", 16))}


class Reader(Protocol):
    """Where a streaming source's frames come from."""

    def pieces(self, video: int, lo: int, hi: int) -> list[Piece]:
        """The segments that hold frames [lo, hi) of `video`, in order."""
        ...

    def load(self, key: Key) -> list[tuple[Key, Segment]]:
        """Segment `key`, decoded, and any other whole segments the same read produced (worth caching)."""
        ...

    def estimate(self, key: Key) -> int:
        """About how many bytes segment `key` takes decoded (for read-ahead accounting)."""
        ...


@dataclass(frozen=True)
class Catalog:
    """The videos a streaming source samples from."""

    lengths: np.ndarray  # (N,) int64: frames per video
    labels: np.ndarray  # (N,) int64: each video's label id, -1 when unlabelled
    label_names: tuple[str, ...]  # label id -> name
    sources: tuple[str, ...]  # where each video came from (file, folder), for messages and records

    def __post_init__(self) -> None:
        assert self.lengths.shape == self.labels.shape == (len(self.sources),), (self.lengths.shape,
                                                                                 self.labels.shape)


class SegmentCache:
    """Decoded segments, least recently used first out, within a byte budget, read by a thread pool.

    The pool is made on first use and dropped when the cache is pickled (a source handed to another
    process starts with an empty cache). Counters: `reads` (segments read from storage), `hits`, `peak`
    (the most bytes held at once)."""

    def __init__(self, reader: Reader, budget: int, workers: int) -> None:
        self.reader, self.budget, self.workers = reader, budget, max(1, workers)
        self._init()

    def _init(self) -> None:
        self._lock = threading.Lock()
        self._segments: OrderedDict[Key, Segment] = OrderedDict()
        self._inflight: dict[Key, Future[None]] = {}
        self._pinned: set[Key] = set()
        self._pool: ThreadPoolExecutor | None = None
        self.held = 0  # bytes in the cache now
        self.reads = self.hits = self.peak = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"reader": self.reader, "budget": self.budget, "workers": self.workers}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init()

    def get(self, keys: list[Key]) -> dict[Key, Segment]:
        """The segments `keys` (read now where missing); they stay cached until the next `get`."""
        first = True
        while True:
            with self._lock:
                self._pinned = set(keys)
                self._evict()  # what the last micro-batch pinned beyond the budget goes now
                missing = [k for k in dict.fromkeys(keys) if k not in self._segments]
                if first:
                    self.hits += len(set(keys)) - len(missing)
                    first = False
                if not missing:
                    for k in keys:
                        self._segments.move_to_end(k)
                    return {k: self._segments[k] for k in keys}
                futures = [self._submit(k) for k in missing]
            wait(futures)
            for f in futures:
                f.result()  # a read that failed raises here, in the caller's thread

    def prefetch(self, keys: list[Key]) -> None:
        """Start reading `keys` in the background, as far as the budget leaves room for them."""
        with self._lock:
            pending = sum(self.reader.estimate(k) for k in self._inflight)
            for k in dict.fromkeys(keys):
                if k in self._segments or k in self._inflight:
                    continue
                size = self.reader.estimate(k)
                if self.held + pending + size > self.budget:
                    break
                pending += size
                self._submit(k)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _submit(self, key: Key) -> Future[None]:
        """Under the lock: the future of reading `key`."""
        future = self._inflight.get(key)
        if future is None:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="lamina-read")
            future = self._inflight[key] = self._pool.submit(self._read, key)
        return future

    def _read(self, key: Key) -> None:
        try:
            loaded = self.reader.load(key)
        except BaseException:
            with self._lock:
                self._inflight.pop(key, None)
            raise
        with self._lock:
            self._inflight.pop(key, None)  # in the same step as the insert: no moment where it is neither
            self.reads += 1
            for k, segment in loaded:
                if k in self._segments:
                    continue
                self._segments[k] = segment
                self.held += segment.nbytes
            self._evict()
            self.peak = max(self.peak, self.held)

    def _evict(self) -> None:
        """Under the lock: drop least recently used segments until within budget; pinned ones stay."""
        for k in list(self._segments):
            if self.held <= self.budget:
                break
            if k not in self._pinned:
                self.held -= self._segments.pop(k).nbytes


class StreamingSource:
    """A `Source` over a catalog of videos read through a `Reader` ([Note: streaming clips])."""

    def __init__(self, name: str, reader: Reader, catalog: Catalog, frame_shape: tuple[int, int, int],
                 clips: int, clip_len: int, seed: int, stride: int = 1, cache_mb: float = 512,
                 readahead: int = 2, workers: int = 2) -> None:
        span = clip_span(clips, clip_len, stride)
        eligible = np.flatnonzero(catalog.lengths >= span)
        if not len(eligible):
            raise ConfigError(f"--clip-len {clip_len} at --stride {stride} spans {span} frames, more than any "
                              f"video of {name} has (the longest: {int(catalog.lengths.max())} frames)")
        short = len(catalog.lengths) - len(eligible)
        if short:
            logger.info("%s: %d of %d videos are shorter than a clip (%d frames) and are never drawn", name,
                        short, len(catalog.lengths), span)
        if len(eligible) < clips:
            raise ConfigError(f"--clips {clips} is more than the {len(eligible)} videos of {name} long enough for "
                              f"a clip: the clips of a micro-batch come from distinct videos (negatives from the "
                              f"clip's own video poison contrastive objectives)")
        self.name, self.reader, self.catalog, self.frame_shape = name, reader, catalog, frame_shape
        self.clips, self.clip_len, self.seed, self.stride, self.span = clips, clip_len, seed, stride, span
        self.readahead = max(0, readahead)
        self.eligible = eligible
        self.cache = SegmentCache(reader, int(cache_mb * 2**20), workers)

    def plan(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Micro-batch m's videos and first frames: a pure function of (seed, m)."""
        if m < 0:
            raise ValueError(f"micro-batch index must be >= 0 (got {m})")
        rng = np.random.default_rng([self.seed, m])
        n = len(self.eligible)
        videos = self.eligible[rng.choice(n, size=self.clips, replace=n < self.clips)]
        starts = rng.integers(0, self.catalog.lengths[videos] - self.span + 1)
        return videos, starts

    def batch(self, m: int) -> MicroBatch:
        videos, starts = self.plan(m)
        pieces = [self.reader.pieces(int(v), int(s), int(s) + self.span) for v, s in zip(videos, starts)]
        segments = self.cache.get([p.key for clip in pieces for p in clip])
        for ahead in range(m + 1, m + 1 + self.readahead):
            v2, s2 = self.plan(ahead)
            self.cache.prefetch([p.key for v, s in zip(v2, s2)
                                 for p in self.reader.pieces(int(v), int(s), int(s) + self.span)])
        c, h, w = self.frame_shape
        frames = np.empty((self.clips, self.span, h, w, c), np.uint8)
        labels = np.empty((self.clips, self.span), np.int64)
        for i, clip in enumerate(pieces):
            at = 0
            for p in clip:
                seg = segments[p.key]
                frames[i, at:at + p.hi - p.lo] = seg.frames[p.lo:p.hi]
                labels[i, at:at + p.hi - p.lo] = (seg.labels[p.lo:p.hi] if seg.labels is not None
                                                  else self.catalog.labels[videos[i]])
                at += p.hi - p.lo
            assert at == self.span, (at, self.span)
        take = slice(None, None, self.stride)
        return MicroBatch(m, _to_float(frames[:, take]), tuple(int(v) for v in videos),
                          tuple(int(s) for s in starts), torch.from_numpy(np.ascontiguousarray(labels[:, take])))

    def stream(self, start: int = 0, stop: int | None = None) -> Iterator[MicroBatch]:
        """Micro-batches start, start+1, ... (up to stop, exclusive, or forever)."""
        m = start
        while stop is None or m < stop:
            yield self.batch(m)
            m += 1

    def close(self) -> None:
        """Stop the reading threads (a source is usable again afterwards: they restart on demand)."""
        self.cache.close()


def sample_frames(length: int, count: int) -> np.ndarray:
    """`count` frame indices spread evenly over a video of `length` frames (repeats when it is shorter)."""
    return np.round(np.linspace(0, length - 1, count)).astype(np.int64)


def sample_videos(name: str, reader: Reader, catalog: Catalog, frame_shape: tuple[int, int, int],
                  videos: int, frames: int, cache_mb: float = 256, workers: int = 2) -> Videos:
    """A bounded sample in memory, for the probe ([Note: probing streamed data]): `frames` frames spread
    evenly over each of at most `videos` videos (a fixed random subset when there are more)."""
    n = len(catalog.lengths)
    chosen = np.arange(n) if n <= videos else np.sort(np.random.default_rng(0).choice(n, videos, replace=False))
    c, h, w = frame_shape
    out = np.empty((len(chosen), frames, h, w, c), np.uint8)
    labels = np.empty((len(chosen), frames), np.int64)
    cache = SegmentCache(reader, int(cache_mb * 2**20), workers)
    try:
        for i, v in enumerate(chosen):
            idx = sample_frames(int(catalog.lengths[v]), frames)
            pieces = [reader.pieces(int(v), int(k), int(k) + 1)[0] for k in idx]
            segments = cache.get([p.key for p in pieces])
            for j, p in enumerate(pieces):
                seg = segments[p.key]
                out[i, j] = seg.frames[p.lo]
                labels[i, j] = seg.labels[p.lo] if seg.labels is not None else catalog.labels[v]
    finally:
        cache.close()
    return Videos(_to_float(out), torch.from_numpy(labels), False, name)


def _to_float(frames: np.ndarray) -> torch.Tensor:
    """(..., H, W, C) uint8 -> (..., C, H, W) float32 in [0, 1], the values `x.float() / 255` gives.

    In numpy: measured here, torch's uint8 -> float of a permuted (16, 8, 3, 32, 32) batch took 8-23 ms with
    2 intra-op threads on a busy 2-core machine (its threads wait for cores) and 0.2 ms in numpy."""
    x = frames.transpose(*range(frames.ndim - 3), -1, -3, -2).astype(np.float32, order="C")
    x /= np.float32(255.0)
    return torch.from_numpy(x)
