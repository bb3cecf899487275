"""`lamina push`: send a data spec's videos to a `lamina serve` run as live streams — the handy client.

Any spec pipeline.sources reads (npz:, parquet:, video:, moving-mnist:, synthetic) becomes one stream per
sequence (a video file, an image sequence, a dataset's video: every frame of it), pushed by concurrent Push
calls, or, with `one_stream`, a single stream that plays the sequences one after another. At `fps` each stream is paced like a camera (capture time = when the frame is sent);
without, frames go as fast as the server takes them (its flow control slows the client when training is
behind). The token comes from a file or an environment variable, never from the command line.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import torch

from pipeline.ingest.proto.lamina.v1 import ingest_pb2 as pb
from pipeline.ingest.server import SERVICE

logger = logging.getLogger(__name__)

ENCODINGS = {"raw": pb.RAW, "png": pb.PNG, "jpeg": pb.JPEG}


@dataclass(frozen=True)
class Stream:
    """One stream to push: its id, its frames (a sequence of (H, W, C) uint8 arrays, read in order) and a
    label per frame (-1: none)."""

    name: str
    frames: Sequence[np.ndarray]
    labels: np.ndarray


class _Decoded(Sequence[np.ndarray]):
    """The frames of one video of a `video:` or `parquet:` spec, decoded one segment at a time as they are
    read in order (pipeline/sources/streaming.py's Reader): a long video never sits in memory whole."""

    def __init__(self, reader: Any, video: int, length: int) -> None:
        self.reader, self.video, self.length = reader, video, length
        self._segment: tuple[Any, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: Any) -> Any:
        piece = self.reader.pieces(self.video, i, i + 1)[0]
        if self._segment is None or self._segment[0] != piece.key:
            self._segment = (piece.key, dict(self.reader.load(piece.key))[piece.key].frames)
        return self._segment[1][piece.lo]


class _Chain(Sequence[np.ndarray]):
    """Several streams' frames one after another, as one."""

    def __init__(self, parts: list[Sequence[np.ndarray]]) -> None:
        self.parts, self.ends = parts, np.cumsum([len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, i: Any) -> Any:
        k = int(np.searchsorted(self.ends, i, side="right"))
        return self.parts[k][i - (int(self.ends[k - 1]) if k else 0)]


def streams_of(spec: str, size: int, one_stream: bool = False, prefix: str = "") -> list[Stream]:
    """The sequences of a data spec as streams: one per video (or sequence), or with `one_stream` a single
    stream playing them one after another. `video:` and `parquet:` are decoded as they are pushed, every
    frame of every video; the other specs are loaded (at size x size)."""
    kind, _, arg = spec.partition(":")
    if kind in ("video", "parquet"):
        if kind == "video":
            from pipeline.sources.video import open_videos

            opened: Any = open_videos(arg, size)
        else:
            from pipeline.sources.parquet import open_dataset

            opened = open_dataset(arg)
        lengths, labels = opened.catalog.lengths, opened.catalog.labels
        parts: list[Sequence[np.ndarray]] = [_Decoded(opened.reader, v, int(n)) for v, n in enumerate(lengths)]
        per_frame = [np.full(int(n), int(label), np.int64) for n, label in zip(lengths, labels, strict=True)]
    else:
        from pipeline.sources import load_videos

        videos = load_videos(spec, size, "train")
        frames = (videos.frames * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
        parts, per_frame = list(frames), list(videos.labels.numpy())
    if one_stream:
        return [Stream(f"{prefix}all", _Chain(parts), np.concatenate(per_frame))]
    return [Stream(f"{prefix}{i}", part, lab) for i, (part, lab) in enumerate(zip(parts, per_frame, strict=True))]


def encode(pixels: np.ndarray, encoding: str, quality: int = 90) -> pb.Frame:
    """A Frame message with the pixels (H, W, C) uint8 in `encoding` (stream and index left to the caller)."""
    if encoding == "raw":
        return pb.Frame(encoding=pb.RAW, data=pixels.tobytes(), shape=list(pixels.shape), dtype="uint8")
    from PIL import Image

    image = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    out = io.BytesIO()
    image.save(out, format="PNG" if encoding == "png" else "JPEG", **({"quality": quality} if encoding == "jpeg" else {}))
    return pb.Frame(encoding=ENCODINGS[encoding], data=out.getvalue())


def frames(stream: Stream, encoding: str = "raw", fps: float | None = None, first: int = 0,
           loops: int = 1) -> Iterator[pb.Frame]:
    """The stream's Frame messages, paced at `fps` (None: as fast as the call takes them), its frames played
    `loops` times in a row (a turntable turning again; indices go on)."""
    t0 = time.monotonic()
    length = len(stream.frames)
    for i in range(length * loops):
        if fps:
            time.sleep(max(0.0, t0 + i / fps - time.monotonic()))
        msg = encode(stream.frames[i % length], encoding)
        msg.stream, msg.index, msg.capture_time = stream.name, first + i, time.time()
        if stream.labels[i % length] >= 0:
            msg.label = int(stream.labels[i % length])
        yield msg


def channel(address: str, tls_ca: bytes | None = None) -> grpc.Channel:
    options = [("grpc.max_send_message_length", 64 << 20)]
    if tls_ca is not None:
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=tls_ca), options=options)
    return grpc.insecure_channel(address, options=options)


def push(address: str, token: str, streams: list[Stream], *, encoding: str = "raw", fps: float | None = None,
         tls_ca: bytes | None = None, parallel: int = 32, loops: int = 1) -> list[pb.PushReply]:
    """Push every stream in its own call, up to `parallel` at once; the replies, in the streams' order."""
    if encoding not in ENCODINGS:
        raise ValueError(f"--encoding must be one of {sorted(ENCODINGS)} (got {encoding!r})")
    with channel(address, tls_ca) as ch:
        call = ch.stream_unary(f"/{SERVICE}/Push", request_serializer=pb.Frame.SerializeToString,
                               response_deserializer=pb.PushReply.FromString)
        metadata = (("authorization", f"Bearer {token}"),)
        with futures.ThreadPoolExecutor(max_workers=max(1, min(parallel, len(streams)))) as pool:
            jobs = [pool.submit(call, frames(s, encoding, fps, loops=loops), metadata=metadata) for s in streams]
            return [j.result() for j in jobs]


def summary(replies: list[pb.PushReply]) -> str:
    """`lamina push`'s report: totals, then each rejection reason with a count and its first message."""
    accepted = sum(r.accepted for r in replies)
    rejected = sum(r.rejected for r in replies)
    clips = sum(s.clips for r in replies for s in r.streams)
    pending = sum(s.pending for r in replies for s in r.streams)
    lines = [f"{len(replies)} stream(s): {accepted} frames taken, {rejected} refused, {clips} clips queued"
             + (f", {pending} frames wait for the rest of their clip" if pending else "")
             + (f"; the server dropped {max(r.dropped_frames for r in replies)} frames so far (--when-full "
                f"drop-oldest)" if any(r.dropped_frames for r in replies) else "")]
    first: dict[int, tuple[int, str]] = {}
    for r in replies:
        for j in r.rejections:
            n, msg = first.get(j.reason, (0, j.message))
            first[j.reason] = (n + 1, msg)
    for reason, (n, msg) in first.items():
        lines.append(f"  {pb.Reason.Name(reason)} x{n}: {msg}")
    return "\n".join(lines)
