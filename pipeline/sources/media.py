"""Reading real video with PyAV (FFmpeg): one checked pass over a video, a range of frames by seeking, and
every frame brought to SIZE x SIZE. Which files a path names, and their labels: files.py.

A *video* here is a video file (any container and codec FFmpeg reads) or an image-sequence folder (its
image files in name order, one frame each). `lamina prepare` and the `video:` data spec read them through
this module alone, so both see the same pixels for the same file.

[Note: damaged video]
FFmpeg plays damaged files as well as it can: it conceals broken macroblocks and stops early at a
truncation without saying so to its caller. Training on such a file would be silent garbage, so a video is
*damaged* (skipped and counted, or an error with `--strict`) when, over one full pass:
  - it cannot be opened, is empty, is not a regular file, or FFmpeg does not recognise it;
  - it has no video stream (an audio-only file) or no decodable frame;
  - the demuxer marks a packet corrupt, or the decoder reports any error: decoders run with
    `err_detect=explode`, which turns a concealed error (a flipped byte) into an exception;
  - the frame size changes midway (every frame of a video must have one size);
  - it ends before what its container declares: fewer frames than the stream's frame count (mp4, avi), or
    its streams end more than max(2 frames, 2 %) before the container's duration (mkv, webm, ts).
What this cannot see: damage to streams lamina does not decode (audio), and a truncation that removes less
than the tolerance (the frames that remain are intact).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, NamedTuple

import av
import av.filter
import numpy as np

from pipeline.sources.files import FITS, BadVideo, Item

logger = logging.getLogger(__name__)

_TRUNCATION_FRAMES = 2  # [Note: damaged video]: tolerance of the duration check, in frame periods ...
_TRUNCATION_FRACTION = 0.02  # ... or as a fraction of the declared duration, whichever is larger


class Converter:
    """An FFmpeg frame -> (size, size, channels) uint8, through a filter graph per input size and pixel
    format: centre crop to a square (fit "crop") or not ("squash"), area-averaged resize, RGB or grey.
    Measured here: about as fast as the decoding itself (one 768x432 h264 frame: ~0.5 ms either way).
    Not thread-safe: one per thread."""

    def __init__(self, size: int, channels: int, fit: str) -> None:
        assert channels in (1, 3) and fit in FITS, (channels, fit)
        self.size, self.channels, self.fit = size, channels, fit
        self._graphs: dict[tuple[int, int, str], Any] = {}

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        key = (frame.width, frame.height, frame.format.name)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._graph(*key)
        frame.pts = None  # the filters need no time; images have none
        graph.push(frame)
        out = graph.pull().to_ndarray()
        return out if out.ndim == 3 else out[:, :, None]

    def _graph(self, width: int, height: int, pix: str) -> Any:
        g = av.filter.Graph()
        # One thread: the callers' threads already convert in parallel, and a graph with threads of its own
        # (swscale's slice threads, by default one per core) must join them when freed. PyAV's graphs are
        # freed by the cyclic GC, which may run in a forked child before exec (subprocess with preexec_fn:
        # Ray's ray.init), where those threads do not exist: seen here as a child hung in
        # pthread_cond_destroy under sws_freeContext.
        g.threads = 1
        chain = [g.add_buffer(width=width, height=height, format=av.VideoFormat(pix), time_base=Fraction(1, 1000))]
        if self.fit == "crop":
            chain.append(g.add("crop", "w=min(iw\\,ih):h=min(iw\\,ih)"))
        chain.append(g.add("scale", f"w={self.size}:h={self.size}:flags=area"))
        chain.append(g.add("format", "rgb24" if self.channels == 3 else "gray"))
        chain.append(g.add("buffersink"))
        for a, b in itertools.pairwise(chain):
            a.link_to(b)
        g.configure()
        return g


class Frame(NamedTuple):
    number: int  # presentation order, from 0
    time: float  # seconds from the stream's start (NaN for images)
    pts: int | None  # the stream's presentation timestamp (None for images or when the stream has none)
    key: bool  # a keyframe: decoding can start here
    image: np.ndarray | None  # (size, size, channels) uint8, when a Converter was given


@dataclass(frozen=True)
class Index:
    """What one checked pass learned about a video: enough to decode any range of it again."""

    frames: int  # frames in presentation order
    pts: np.ndarray | None  # (frames,) int64 increasing presentation timestamps; None: cannot seek
    keyframes: np.ndarray  # (k,) int64 ascending frame indices where decoding can start; [0] at least
    fps: float  # average frame rate (0 when unknown or for images)
    width: int  # source frame size
    height: int


def read(item: Item, convert: Converter | None = None) -> Iterator[Frame]:
    """Every frame of `item`, checked ([Note: damaged video]); raises BadVideo as soon as the item proves
    damaged, which may be after frames were yielded (a truncation shows only at the end)."""
    if item.images:
        yield from _read_images(item, convert)
        return
    with _open(item.path) as container:
        stream = _video_stream(container)
        stream.codec_context.options = {"err_detect": "explode"}  # [Note: damaged video]
        stream.codec_context.thread_count = 1  # parallel over files instead (and no threads to join)
        base = stream.time_base
        start = stream.start_time or 0
        first: av.VideoFrame | None = None
        n = 0
        ends: dict[int, float] = {}  # stream index -> end time (s) of its last packet
        try:
            for packet in container.demux():
                if packet.is_corrupt:
                    raise BadVideo(f"damaged: a corrupt packet after frame {n}")
                if packet.pts is not None and packet.stream.time_base is not None:
                    end = float((packet.pts + (packet.duration or 0)) * packet.stream.time_base)
                    ends[packet.stream.index] = max(ends.get(packet.stream.index, end), end)
                if packet.stream.index != stream.index:
                    continue
                for frame in packet.decode():
                    if first is None:
                        first = frame
                    elif (frame.width, frame.height) != (first.width, first.height):
                        raise BadVideo(f"the frame size changes midway, from {first.width}x{first.height} to "
                                       f"{frame.width}x{frame.height} at frame {n}")
                    time = float((frame.pts - start) * base) if frame.pts is not None and base else float("nan")
                    yield Frame(n, time, frame.pts, bool(frame.key_frame), convert(frame) if convert else None)
                    n += 1
        except av.FFmpegError as e:
            raise BadVideo(f"damaged: FFmpeg cannot decode it after frame {n} ({_reason(e)})") from None
        if n == 0:
            raise BadVideo("no decodable frames")
        declared = stream.frames
        if declared and n < declared:
            raise BadVideo(f"truncated: {n} of the {declared} frames its container declares")
        if container.duration and ends:
            duration = container.duration / av.time_base
            origin = (container.start_time or 0) / av.time_base
            fps = float(stream.average_rate or 0)
            slack = max(_TRUNCATION_FRAMES / fps if fps > 0 else 0.0, _TRUNCATION_FRACTION * duration)
            end = max(ends.values()) - origin
            if end < duration - slack:
                raise BadVideo(f"truncated: its streams end at {end:.2f} s of the {duration:.2f} s its container "
                               f"declares")


def index(item: Item) -> Index:
    """One checked pass over `item` (BadVideo if damaged): its frame count, timestamps and keyframes."""
    pts: list[int | None] = []
    keys: list[int] = []
    for f in read(item, None):
        pts.append(f.pts)
        if f.key:
            keys.append(f.number)
    width, height, fps = describe(item)
    arr: np.ndarray | None = None
    if all(p is not None for p in pts):
        arr = np.array(pts, np.int64)
        if len(arr) > 1 and not (np.diff(arr) > 0).all():
            arr = None  # timestamps that repeat or go back: decode from the start instead of seeking
    if item.images:
        keyframes = np.arange(len(pts), dtype=np.int64)  # every image is its own start
    elif arr is None or not keys or keys[0] != 0:
        keyframes = np.zeros(1, np.int64)
    else:
        keyframes = np.array(keys, np.int64)
    return Index(len(pts), arr, keyframes, fps, width, height)


def decode_range(item: Item, idx: Index, lo: int, hi: int, convert: Converter) -> np.ndarray:
    """Frames [lo, hi) of an indexed item as (hi - lo, size, size, channels) uint8: decoding starts at the
    last keyframe at or before lo (or at the start when the video cannot seek), so the pixels are those of
    a pass from the start. Raises BadVideo when the file no longer gives what its index says."""
    assert 0 <= lo < hi <= idx.frames, (lo, hi, idx.frames)
    out = np.empty((hi - lo, convert.size, convert.size, convert.channels), np.uint8)
    if item.images:
        for k in range(lo, hi):
            out[k - lo] = _decode_image(item.images[k], convert)
        return out
    start = int(idx.keyframes[np.searchsorted(idx.keyframes, lo, side="right") - 1])
    got = _decode_into(item.path, idx, lo, hi, convert, out, seek=idx.pts is not None and start > 0,
                       start=start)
    if got < 0:  # the seek landed after lo (mpeg-ts seeks by bytes): the same frames from the start
        logger.debug("%s: seeking to frame %d missed; decoding from the start", item.path, start)
        got = _decode_into(item.path, idx, lo, hi, convert, out, seek=False, start=0)
    if got != hi - lo:
        raise BadVideo(f"gave {max(got, 0)} of frames {lo}-{hi - 1} on a second read: it changed since it "
                       f"was indexed")
    return out


def _decode_into(path: str, idx: Index, lo: int, hi: int, convert: Converter, out: np.ndarray, seek: bool,
                 start: int) -> int:
    """Decode frames [lo, hi) into out, from keyframe `start` (seek) or from the beginning; the number of
    frames found, or -1 when the seek landed after lo."""
    got = 0
    with _open(path) as container:
        stream = _video_stream(container)
        stream.codec_context.options = {"err_detect": "explode"}
        stream.codec_context.thread_count = 1  # the caller's threads decode several segments at once
        try:
            if seek:
                assert idx.pts is not None
                container.seek(int(idx.pts[start]), stream=stream, backward=True, any_frame=False)
            n = -1
            for frame in container.decode(stream):
                if idx.pts is not None:
                    if frame.pts is None:
                        continue
                    n = int(np.searchsorted(idx.pts, frame.pts))
                    if n >= idx.frames or idx.pts[n] != frame.pts:
                        continue  # not a frame of the index (a leading frame of an open GOP after a seek)
                else:
                    n += 1
                if seek and got == 0 and n > lo:
                    return -1
                if lo <= n < hi:
                    out[n - lo] = convert(frame)
                    got += 1
                if n >= hi - 1 and got == hi - lo:
                    break
        except av.FFmpegError as e:
            raise BadVideo(f"damaged: FFmpeg cannot decode frames {lo}-{hi - 1} ({_reason(e)})") from None
    return got


def describe(item: Item) -> tuple[int, int, float]:
    """(width, height, average frames/s) of the source; frames/s is 0 for images or when unknown."""
    if item.images:
        return (*_image_size(item), 0.0)
    return _stream_facts(item.path)


def _open(path: str) -> Any:
    """av.open for reading, with BadVideo for every way a file can fail to open."""
    try:
        if not os.path.isfile(path):
            raise BadVideo("cannot read: no such file (a dangling link?)" if not os.path.exists(path)
                           else "cannot read: not a regular file")
        if os.path.getsize(path) == 0:
            raise BadVideo("empty file (0 bytes)")
        with open(path, "rb"):
            pass  # permission problems read as such, not as FFmpeg's "invalid data"
    except OSError as e:
        raise BadVideo(f"cannot read: {e.strerror}") from None
    try:
        return av.open(path, metadata_errors="ignore")
    except (av.FFmpegError, OSError, ValueError) as e:
        raise BadVideo(f"not a video FFmpeg can read ({_reason(e)})") from None


def _video_stream(container: Any) -> Any:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        raise BadVideo("no video stream (audio only)" if kinds == ["audio"] else
                       f"no video stream (streams: {', '.join(kinds) or 'none'})")
    return container.streams.video[0]


def _stream_facts(path: str) -> tuple[int, int, float]:
    with _open(path) as container:
        s = _video_stream(container)
        return int(s.codec_context.width), int(s.codec_context.height), float(s.average_rate or 0)


def _read_images(item: Item, convert: Converter | None) -> Iterator[Frame]:
    size: tuple[int, int] | None = None
    for n, path in enumerate(item.images):
        frame = _image_frame(path)
        if size is None:
            size = (frame.width, frame.height)
        elif (frame.width, frame.height) != size:
            raise BadVideo(f"image {os.path.basename(path)} is {frame.width}x{frame.height}; the sequence's "
                           f"first image is {size[0]}x{size[1]}")
        yield Frame(n, float("nan"), None, True, convert(frame) if convert else None)


def _image_frame(path: str) -> av.VideoFrame:
    try:
        with _open(path) as container:
            stream = _video_stream(container)
            for frame in container.decode(stream):
                return frame
    except BadVideo as e:
        raise BadVideo(f"image {os.path.basename(path)}: {e}") from None
    except av.FFmpegError as e:
        raise BadVideo(f"image {os.path.basename(path)}: cannot decode ({_reason(e)})") from None
    raise BadVideo(f"image {os.path.basename(path)}: holds no picture")


def _decode_image(path: str, convert: Converter) -> np.ndarray:
    return convert(_image_frame(path))


def _image_size(item: Item) -> tuple[int, int]:
    f = _image_frame(item.images[0])
    return int(f.width), int(f.height)


def _reason(e: BaseException) -> str:
    """FFmpeg's own words without the errno and the file name PyAV adds."""
    text = getattr(e, "strerror", None) or str(e)
    return str(text).strip()
