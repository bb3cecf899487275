"""Cutting a stream into clips: T frames each, consecutive clips overlapping by one frame.

[Note: live clips]
A stream's frames arrive by index. The cutter keeps the frames of the clip being filled; when it holds T of
them the clip is complete and the last frame stays as the first of the next clip, so every consecutive pair
(n, n+1) of the stream lies inside exactly one clip and none is lost:

    frames  0 1 2 3 4 5 6 7 8 9 ...          T = 4
    clips   [0 1 2 3]
                  [3 4 5 6]
                        [6 7 8 9]

A clip never mixes streams (one cutter per stream). An index that jumps ahead (a gap) breaks the stream:
the frames of the unfinished clip are dropped (they hold no pair that crosses the gap, but the pairs among
them are lost; counted as `unused`) and the frame after the gap starts a new clip. An index at or below the
last one taken is refused (duplicate, out of order), so a stream's clips are always in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.ingest.proto.lamina.v1 import ingest_pb2 as pb


@dataclass(frozen=True, eq=False)  # compared by identity: the buffer removes the very clip it took
class Clip:
    """T consecutive frames of one stream, ready for a micro-batch."""

    stream: str  # stream id
    number: int  # which stream, in order of first appearance (a micro-batch's `sequences`)
    start: int  # index of its first frame in the stream
    frames: np.ndarray  # (T, C, H, W) uint8
    labels: np.ndarray  # (T,) int64; -1: no label
    captured: float  # capture time of its last frame (seconds since the epoch; 0: unknown)

    @property
    def nbytes(self) -> int:
        return int(self.frames.nbytes)


@dataclass
class Cutter:
    """The state of one stream: the index it expects next and the clip it is filling."""

    stream: str
    number: int
    clip_len: int
    next_index: int | None = None  # None until the first frame
    shape: tuple[int, ...] | None = None  # (H, W, C) of its frames as pushed, set by the first frame
    frames: list[np.ndarray] = field(default_factory=list)  # the clip being filled
    labels: list[int] = field(default_factory=list)
    carried: bool = False  # frames[0] is the last frame of the previous clip (already in a clip)

    def check_index(self, index: int) -> tuple[int, str] | None:
        """(reason, message) when the frame at `index` must be refused; None when it may be taken."""
        if self.next_index is None or index >= self.next_index:
            return None
        if index == self.next_index - 1:
            return pb.DUPLICATE, f"stream {self.stream!r}: frame {index} again (the last one taken)"
        return pb.OUT_OF_ORDER, f"stream {self.stream!r}: frame {index} after frame {self.next_index - 1}"

    def check_shape(self, shape: tuple[int, ...]) -> tuple[int, str] | None:
        if self.shape is None or shape == self.shape:
            return None
        h, w, c = self.shape
        return pb.SIZE_MISMATCH, (f"stream {self.stream!r}: frame is {shape[1]}x{shape[0]}x{shape[2]}, the "
                                  f"stream's frames are {w}x{h}x{c}")

    @property
    def pending(self) -> int:
        """Frames taken that are in no clip yet."""
        return len(self.frames) - int(self.carried)

    def take(self, index: int, shape: tuple[int, ...], frame: np.ndarray, label: int,
             captured: float) -> tuple[Clip | None, int]:
        """Take a checked frame; returns (the clip it completed or None, frames dropped at a gap)."""
        dropped = 0
        if self.next_index is not None and index > self.next_index:  # a gap: the unfinished clip is lost
            dropped = self.pending
            self.frames, self.labels, self.carried = [], [], False
        self.shape = self.shape or shape
        self.next_index = index + 1
        self.frames.append(frame)
        self.labels.append(label)
        if len(self.frames) < self.clip_len:
            return None, dropped
        clip = Clip(self.stream, self.number, index - self.clip_len + 1, np.stack(self.frames),
                    np.asarray(self.labels, dtype=np.int64), captured)
        self.frames, self.labels, self.carried = self.frames[-1:], self.labels[-1:], True
        return clip, dropped
