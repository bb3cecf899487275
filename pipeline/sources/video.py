"""`video:PATH[,key=value...]`: video files decoded on the fly, no preparation step.

PATH is a video file, a folder (walked recursively: its video files, and each folder of images as one image
sequence) or a glob (`clips/*.mp4`, `data/**/*.mkv`); it may not contain commas. Options:
  labels        folder | stem | none   a video's label: its parent folder's name, its file's stem, or none
                                       (default folder)
  fit           crop | squash          square frames by a centre crop to the short side, or by resizing as is
                                       (default crop)
  channels      3 | 1                  RGB or grey (default 3)
  strict        0 | 1                  1: a damaged or unreadable file stops the command (default 0: skipped,
                                       with a warning naming it, and counted)
  cache         MB of decoded frames kept ([Note: streaming clips]; default 512; 0: only the
                                       micro-batch being assembled, and no read-ahead)
  readahead     micro-batches read ahead in the background (default 2)
  workers       decoding threads (default: the machine's cores)
  probe_videos  the probe's sample: at most this many videos ... (default 500)
  probe_frames  ... with this many frames each, spread evenly over the video (default 16)

Opening the source decodes every file once to check it ([Note: damaged video] in media.py) and to learn its
frame count, timestamps and keyframes; clips are then decoded when a micro-batch needs them, from the
keyframe before their first frame, in segments of SEGMENT frames that the cache keeps. Decoding
costs far more than reading a prepared dataset (`lamina bench` measures both), so for long training runs,
or data that should not be decoded again every run, `lamina prepare` the files once and train on
`parquet:`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from pipeline.errors import DataError
from pipeline.sources.files import FITS, LABELS, BadVideo, Item, discover
from pipeline.sources.media import Converter, Index, decode_range, index
from pipeline.sources.options import OptionSpec, parse_options
from pipeline.sources.streaming import (
    STREAM_OPTIONS,
    Catalog,
    Key,
    Piece,
    Segment,
    StreamingSource,
    StreamOptions,
    sample_videos,
)
from pipeline.sources.videos import Videos

logger = logging.getLogger(__name__)

SEGMENT = 64  # frames per cached segment (the last one of a video may be shorter)
MAX_DECODE_AHEAD = 8  # segments one read may hand to the cache (the ones it decoded on its way to the asked one)

_OPTIONS: OptionSpec = {"channels": (int, 1, 3), **STREAM_OPTIONS}
_CHOICES = {"labels": LABELS, "fit": FITS}


@dataclass(frozen=True)
class VideoOptions(StreamOptions):
    labels: str = "folder"
    fit: str = "crop"
    channels: int = 3


def parse_spec(arg: str) -> tuple[str, VideoOptions]:
    """`PATH[,key=value...]` -> (PATH, options); a bad option raises DataError naming it."""
    path, _, rest = arg.partition(",")
    path = path.strip()
    if not path:
        raise DataError("video: no path given (use video:FILE, video:FOLDER or video:GLOB)")
    o = parse_options(rest, _OPTIONS, "video", _CHOICES)
    if "channels" in o and o["channels"] not in (1, 3):
        raise DataError(f"video: option channels={o['channels']} must be 1 or 3")
    return path, VideoOptions(labels=str(o.get("labels", "folder")), fit=str(o.get("fit", "crop")),
                              channels=int(o.get("channels", 3)), **StreamOptions.fields(o))


class VideoReader:
    """The `Reader` of video files: segments cut at keyframes (and every SEGMENT frames), decoded from
    the keyframe before them. Picklable: the per-thread converters are made again where it lands."""

    def __init__(self, items: list[Item], indexes: list[Index], size: int, channels: int, fit: str) -> None:
        self.items, self.indexes = items, indexes
        self.size, self.channels, self.fit = size, channels, fit
        self.frame_bytes = size * size * channels
        # Segment starts per video, then its end: every SEGMENT frames.
        self.bounds = [np.append(np.arange(0, ix.frames, SEGMENT), ix.frames) for ix in indexes]
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def pieces(self, video: int, lo: int, hi: int) -> list[Piece]:
        b = self.bounds[video]
        out = []
        j = int(np.searchsorted(b, lo, side="right")) - 1
        while lo < hi:
            end = min(hi, int(b[j + 1]))
            out.append(Piece((video, j), lo - int(b[j]), end - int(b[j])))
            lo, j = end, j + 1
        return out

    def estimate(self, key: Key) -> int:
        video, j = cast(tuple[int, int], key)
        b = self.bounds[video]
        return int(b[j + 1] - b[j]) * self.frame_bytes

    def load(self, key: Key) -> list[tuple[Key, Segment]]:
        video, j = cast(tuple[int, int], key)
        b, ix = self.bounds[video], self.indexes[video]
        # Decoding starts at the keyframe at or before segment j anyway: hand the cache the segments
        # decoded on the way too (up to MAX_DECODE_AHEAD), so a later clip there costs no decoding.
        keyframe = int(ix.keyframes[np.searchsorted(ix.keyframes, int(b[j]), side="right") - 1])
        first = max(-(-keyframe // SEGMENT), j - MAX_DECODE_AHEAD + 1)  # whole segments from the keyframe on
        convert = getattr(self._local, "convert", None)
        if convert is None:
            convert = self._local.convert = Converter(self.size, self.channels, self.fit)
        try:
            frames = decode_range(self.items[video], ix, int(b[first]), int(b[j + 1]), convert)
        except BadVideo as e:
            raise DataError(f"{self.items[video].path}: {e}") from None
        return [((video, k), Segment(frames[int(b[k] - b[first]):int(b[k + 1] - b[first])]))
                for k in range(first, j + 1)]


@dataclass(frozen=True)
class OpenVideos:
    """The checked videos of a `video:` spec."""

    name: str  # the spec
    reader: VideoReader
    catalog: Catalog
    skipped: tuple[tuple[str, str], ...]  # (path, why) of every damaged or unreadable file
    options: VideoOptions

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return (self.reader.channels, self.reader.size, self.reader.size)


def open_videos(arg: str, size: int) -> OpenVideos:
    """Find, check and index the videos of `video:ARG` ([Note: damaged video]); DataError when none is usable
    (or, with strict=1, on the first bad one)."""
    path, opts = parse_spec(arg)
    name = f"video:{arg}"
    t0 = time.perf_counter()
    items, ignored = discover([path], name)
    workers = opts.workers or os.cpu_count() or 1
    with ThreadPoolExecutor(workers, thread_name_prefix="lamina-index") as pool:
        results = list(pool.map(_try_index, items))
    good: list[tuple[Item, Index]] = []
    skipped: list[tuple[str, str]] = []
    for item, result in zip(items, results):
        if isinstance(result, str):
            if opts.strict:
                raise DataError(f"{item.path}: {result} (strict=1 stops at a bad file; without it, bad files are "
                                f"skipped)")
            logger.warning("%s: skipped %s: %s", name, item.path, result)
            skipped.append((item.path, result))
        else:
            good.append((item, result))
    if not good:
        raise DataError(f"{name}: none of its {len(items)} videos is usable "
                        f"({'; '.join(f'{p}: {why}' for p, why in skipped[:3])})")
    names = [item.label(opts.labels) for item, _ in good]
    label_names = tuple(sorted({n for n in names if n is not None}))
    ids = {n: i for i, n in enumerate(label_names)}
    catalog = Catalog(np.array([ix.frames for _, ix in good], np.int64),
                      np.array([ids[n] if n is not None else -1 for n in names], np.int64), label_names,
                      tuple(item.path for item, _ in good))
    reader = VideoReader([i for i, _ in good], [ix for _, ix in good], size, opts.channels, opts.fit)
    logger.info("%s: %d videos, %d frames, %d labels; checked in %.1f s%s%s", name, len(good),
                int(catalog.lengths.sum()), len(label_names), time.perf_counter() - t0,
                f"; {len(skipped)} damaged or unreadable file(s) skipped" if skipped else "",
                f"; {len(ignored)} file(s) neither video nor image ignored" if ignored else "")
    return OpenVideos(name, reader, catalog, tuple(skipped), opts)


def _try_index(item: Item) -> Index | str:
    try:
        return index(item)
    except BadVideo as e:
        return str(e)


def video_source(arg: str, size: int, clips: int, clip_len: int, seed: int, stride: int = 1) -> StreamingSource:
    """The training source of `video:ARG`."""
    v = open_videos(arg, size)
    o = v.options
    return StreamingSource(v.name, v.reader, v.catalog, v.frame_shape, clips, clip_len, seed, stride,
                           o.cache_mb, o.readahead, o.workers or os.cpu_count() or 1)


def video_videos(arg: str, size: int, split: str) -> Videos:
    """A bounded sample of `video:ARG` in memory, the same for both splits ([Note: probing streamed data])."""
    v = open_videos(arg, size)
    if split == "probe" and not v.catalog.label_names:
        raise DataError(f"{v.name}: no labels (labels=none): the probe needs labels=folder or labels=stem")
    o = v.options
    return sample_videos(v.name, v.reader, v.catalog, v.frame_shape, o.probe_videos, o.probe_frames,
                         min(o.cache_mb, 256), o.workers or os.cpu_count() or 1)
