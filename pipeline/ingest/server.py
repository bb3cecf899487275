"""The ingest's gRPC server (proto/lamina/v1/ingest.proto): Push frames in, Watch metrics out.

Security as the control plane's (pipeline/control/server.py): loopback unless told otherwise, a bearer token
on every call, compared in constant time, refused with UNAUTHENTICATED before any handler runs (so a refused
call changes nothing); TLS when given a certificate and key.

Each Push call runs in a thread of the server's pool and reads its frames one by one: check the index
against the stream's (clips.py), decode (frames.py), check the size, cut. A frame that fails is rejected
with its reason in the reply, and the call and every other stream go on. A complete clip goes into the
bounded buffer (buffer.py); when the buffer is full and the policy is `block`, the handler waits there and
stops reading, so gRPC's flow control holds the client back ([Note: live micro-batches]).

A stream's state (the index it expects, the clip it is filling) outlives the call that pushed it: a client
that disconnects mid-clip can continue the stream at `next_index` in a new call. One call at a time may
push a given stream; another is refused frame by frame (STREAM_BUSY).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from pipeline.control.auth import BearerAuth
from pipeline.ingest.buffer import ClipBuffer
from pipeline.ingest.clips import Cutter
from pipeline.ingest.frames import FrameError, decode, to_frame
from pipeline.ingest.proto.lamina.v1 import ingest_pb2 as pb
from pipeline.ingest.stats import IngestStats

logger = logging.getLogger(__name__)

SERVICE = "lamina.v1.Ingest"
MAX_STREAM_ID = 128
MAX_REJECTIONS = 100  # listed in a reply; all are counted


class IngestServer:
    """Push and Watch for one run; frames go to `buffer` as clips of `clip_len` (channels, size, size)."""

    def __init__(self, buffer: ClipBuffer, stats: IngestStats, token: str, *, clip_len: int, size: int,
                 channels: int = 3, host: str = "127.0.0.1", port: int = 0, tls: tuple[bytes, bytes] | None = None,
                 max_message_bytes: int = 4 << 20, max_calls: int = 64) -> None:
        self.buffer, self.stats = buffer, stats
        self.clip_len, self.size, self.channels = clip_len, size, channels
        self.streams: dict[str, Cutter] = {}
        self._owners: dict[str, int] = {}  # stream -> the call pushing it now
        self._lock = threading.Lock()
        self._calls = itertools.count()
        self._stopping = threading.Event()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_calls + 2, thread_name_prefix="ingest"),
                                   interceptors=[BearerAuth(token)], maximum_concurrent_rpcs=max_calls,
                                   options=[("grpc.max_receive_message_length", max_message_bytes)])
        self._server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
            "Push": grpc.stream_unary_rpc_method_handler(self._push, request_deserializer=pb.Frame.FromString,
                                                         response_serializer=pb.PushReply.SerializeToString),
            "Watch": grpc.unary_stream_rpc_method_handler(self._watch, request_deserializer=pb.WatchRequest.FromString,
                                                          response_serializer=pb.IngestMetrics.SerializeToString),
        })])
        where = f"{host}:{port}"
        if tls is not None:
            key, cert = tls
            self.port = self._server.add_secure_port(where, grpc.ssl_server_credentials([(key, cert)]))
        else:
            self.port = self._server.add_insecure_port(where)
        if self.port == 0:
            raise OSError(f"ingest: cannot bind {where}")
        self.address = f"{host}:{self.port}"

    def start(self) -> IngestServer:
        self._server.start()
        logger.info("ingest listening on %s", self.address)
        return self

    def stop(self, grace: float = 1.0) -> None:
        self._stopping.set()
        self._server.stop(grace=grace).wait()

    # -- Push ----------------------------------------------------------------------------------------

    def _push(self, frames: Iterator[pb.Frame], context: grpc.ServicerContext) -> pb.PushReply:
        call = next(self._calls)
        reply = pb.PushReply()
        summaries: dict[str, pb.StreamSummary] = {}
        owned: set[str] = set()

        def cancelled() -> bool:
            return self._stopping.is_set() or not context.is_active()

        with self.stats.lock:
            self.stats.active_calls += 1
        ending = False  # the run ended while this call was pushing: it is told so (below)
        try:
            for frame in frames:
                if self._stopping.is_set():
                    ending = True
                    break
                self._frame(frame, call, owned, reply, summaries, cancelled)
        except Exception:  # the request iterator raises when the client goes away
            if context.is_active():
                raise
            logger.warning("ingest: a call ended before its client closed it (disconnected, or a message over "
                           "the size limit; streams %s, %d frames taken: kept)",
                           sorted(owned), reply.accepted)
        finally:
            with self._lock:
                for stream in owned:
                    self._owners.pop(stream, None)
                    cutter = self.streams[stream]
                    s = summaries[stream]
                    s.next_index = cutter.next_index if cutter.next_index is not None else 0
                    s.pending = cutter.pending
            with self.stats.lock:
                self.stats.active_calls -= 1
        reply.streams.extend(summaries.values())
        reply.dropped_frames = self.buffer.dropped_frames
        if ending:  # not OK: the client must not take its remaining frames for delivered
            where = ", ".join(f"{s.stream!r} at frame {s.next_index}" for s in reply.streams)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the serve run is ending (its --steps reached, or stopped): "
                                                       f"{reply.accepted} frames of this call were taken, no more "
                                                       f"(streams continue: {where or 'none'})")
        for s in reply.streams:
            if s.pending:
                logger.info("ingest: stream %r stopped mid-clip: %d frames wait for the rest of their clip "
                            "(continue at frame %d)", s.stream, s.pending, s.next_index)
        return reply

    def _frame(self, frame: pb.Frame, call: int, owned: set[str], reply: pb.PushReply,
               summaries: dict[str, pb.StreamSummary], cancelled: Callable[[], bool]) -> None:
        stream = frame.stream
        summary = summaries.setdefault(stream, pb.StreamSummary(stream=stream))

        def reject(reason: Any, message: str) -> None:
            reply.rejected += 1
            summary.rejected += 1
            with self.stats.lock:
                self.stats.rejected += 1
            if len(reply.rejections) < MAX_REJECTIONS:
                reply.rejections.append(pb.Rejection(stream=stream, index=frame.index, reason=reason, message=message))

        if not 1 <= len(stream) <= MAX_STREAM_ID:
            return reject(pb.BAD_STREAM, f"stream id must be 1..{MAX_STREAM_ID} characters (got {len(stream)})")
        with self._lock:
            owner = self._owners.get(stream)
            if owner is not None and owner != call:
                return reject(pb.STREAM_BUSY, f"stream {stream!r} is being pushed by another call")
            cutter = self.streams.get(stream)
            if cutter is None:
                cutter = self.streams[stream] = Cutter(stream, len(self.streams), self.clip_len)
                with self.stats.lock:
                    self.stats.streams += 1
            self._owners[stream] = call
            owned.add(stream)
        if frame.index < 0:
            return reject(pb.OUT_OF_ORDER, f"stream {stream!r}: negative frame index {frame.index}")
        problem = cutter.check_index(frame.index)
        if problem is not None:
            return reject(*problem)
        try:
            pixels = decode(frame.encoding, frame.data, tuple(frame.shape), frame.dtype)
        except FrameError as e:
            return reject(e.reason, f"stream {stream!r} frame {frame.index}: {e}")
        problem = cutter.check_shape(pixels.shape)
        if problem is not None:
            return reject(*problem)
        expected = cutter.next_index
        label = frame.label if frame.HasField("label") else -1
        clip, dropped = cutter.take(frame.index, pixels.shape, to_frame(pixels, self.size, self.channels), label,
                                    frame.capture_time)
        reply.accepted += 1
        summary.accepted += 1
        with self.stats.lock:
            self.stats.frames_in += 1
        if expected is not None and frame.index > expected:
            summary.unused += dropped
            if len(reply.rejections) < MAX_REJECTIONS:
                reply.rejections.append(pb.Rejection(
                    stream=stream, index=frame.index, reason=pb.GAP,
                    message=f"stream {stream!r}: frame {frame.index} after frame {expected - 1} (a gap): taken, "
                            f"starting a new clip; the {dropped} frames of the unfinished clip are dropped"))
        if clip is not None:
            if self.buffer.put(clip, cancelled):
                summary.clips += 1
            else:
                logger.warning("ingest: stream %r: clip at frame %d not queued (the call ended while the "
                               "buffer was full)", stream, clip.start)

    # -- Watch ---------------------------------------------------------------------------------------

    def _watch(self, request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[pb.IngestMetrics]:
        interval = max(0.1, request.interval_s or 1.0)
        while context.is_active() and not self._stopping.is_set():
            yield pb.IngestMetrics(**self.stats.snapshot())
            self._stopping.wait(interval)
