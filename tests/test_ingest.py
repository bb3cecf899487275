"""The live ingest (pipeline/ingest/): a real gRPC server on loopback, a client generated from
proto/lamina/v1/ingest.proto alone (compiled here, in a temporary directory), real Ray stages.

Concurrent streams train the pipeline; every bad input of a Push gets its reason and the other streams
go on; tokens and TLS; a stage killed mid-stream with every pushed clip trained exactly once and the
weights equal to a sequential replay of the same micro-batches; a fast producer into a slow pipeline with
flat memory (a short run here, a minute under -m slow).
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import numpy as np
import psutil
import pytest
import ray
import torch
from support import Recorder, state_differences, tiny_config, wait_until

from pipeline.config import TrainConfig
from pipeline.control import RunControl
from pipeline.engines.local import run_local
from pipeline.engines.placement import StageActors
from pipeline.engines.ray_engine import RayPipeline, run_ray
from pipeline.ingest.serve import Ingest, ServeOptions
from pipeline.sources.source import MicroBatch

pytestmark = pytest.mark.timeout(240)

PROTO = Path(__file__).resolve().parents[1] / "proto"
TOKEN = "test-token-not-secret"
SIZE = 8  # the run's frames; pushed frames are 10x10 and resized by the server


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    """(messages, stubs) compiled from the .proto alone, as any client would: not the project's code."""
    out = tmp_path_factory.mktemp("client")
    from grpc_tools import protoc

    assert protoc.main(["protoc", f"-I{PROTO}", f"--python_out={out}", f"--grpc_python_out={out}",
                        str(PROTO / "lamina" / "v1" / "ingest.proto")]) == 0
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("lamina.v1.ingest_pb2"), importlib.import_module("lamina.v1.ingest_pb2_grpc")
    finally:
        sys.path.remove(str(out))


def config(tmp_path: Path, **overrides: Any) -> TrainConfig:
    fields: dict[str, Any] = {"layers": "conv:4,conv:4", "size": SIZE, "clips": 4, "clip_len": 3, "steps": 12,
                              "checkpoint_every": 3, "run_dir": str(tmp_path / "run")}
    fields.update(overrides)
    return tiny_config("live:test", **fields)


def start_ingest(cfg: TrainConfig, control: RunControl | None = None, **options: Any) -> Ingest:
    opts = ServeOptions(**{"linger": 0.2, **options})
    return Ingest(cfg, opts, TOKEN, control or RunControl(), record_assignments=True).start(Path(cfg.run_dir).name)


def stub(client: tuple[ModuleType, ModuleType], address: str, credentials: Any = None) -> Any:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    return client[1].IngestStub(channel)


AUTH = (("authorization", f"Bearer {TOKEN}"),)


def raw(pb: ModuleType, stream: str, index: int, pixels: np.ndarray, **fields: Any) -> Any:
    return pb.Frame(stream=stream, index=index, capture_time=time.time(), encoding=pb.RAW, data=pixels.tobytes(),
                    shape=list(pixels.shape), dtype=str(pixels.dtype), **fields)


def video(n: int, seed: int, size: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def stream_frames(pb: ModuleType, stream: str, n: int, seed: int, first: int = 0) -> Iterator[Any]:
    pixels = video(n, seed)
    for i in range(n):
        yield raw(pb, stream, first + i, pixels[i], label=seed)


class Recording:
    """Wraps a source: keeps the first answer for every micro-batch and counts answers that differ later."""

    def __init__(self, source: Any) -> None:
        self.source, self.name, self.frame_shape = source, source.name, source.frame_shape
        self.first: dict[int, MicroBatch] = {}
        self.asked: list[int] = []
        self.differing: list[int] = []

    def batch(self, m: int) -> MicroBatch:
        b = self.source.batch(m)
        self.asked.append(m)
        if m not in self.first:
            self.first[m] = b
        elif not (torch.equal(b.frames, self.first[m].frames) and b.starts == self.first[m].starts
                  and torch.equal(b.labels, self.first[m].labels)):
            self.differing.append(m)
        return b


def replayed_sequentially(cfg: TrainConfig, batches: dict[int, MicroBatch]) -> list[dict]:
    """The sequential loop over the very micro-batches the pipeline was handed, on the stages' thread count."""

    class Replay:
        name, frame_shape = "replay", (3, SIZE, SIZE)

        def batch(self, m: int) -> MicroBatch:
            return batches[m]

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.cpus_per_stage)))
    try:
        return run_local(dataclasses.replace(cfg, engine="sequential"), cfg.learner_spec((3, SIZE, SIZE)), Replay(),
                         lambda m, r: None).states
    finally:
        torch.set_num_threads(threads)


def assert_each_clip_once(assignments: dict[int, tuple[tuple[str, int], ...]], clip_len: int,
                          tail: int = 0) -> dict[str, int]:
    """Every stream's fresh clips start at 0, T-1, 2(T-1), ... each in exactly one micro-batch: no clip lost
    or duplicated, so every consecutive pair of frames was trained on once. `tail`: clips a stream may still
    have queued when the run ends (taken out of order, by up to the buffer's span). Clips per stream."""
    starts: dict[str, list[int]] = {}
    for m in sorted(assignments):
        for stream, start in assignments[m]:
            starts.setdefault(stream, []).append(start)
    for stream, got in starts.items():
        assert len(set(got)) == len(got), (stream, got)  # none twice
        every = [k * (clip_len - 1) for k in range(max(got) // (clip_len - 1) + 1)]
        missing = sorted(set(every) - set(got))
        assert len(missing) <= tail, (stream, missing)
    return {s: len(v) for s, v in starts.items()}


# -- training -------------------------------------------------------------------------------------------


def test_concurrent_streams_train_the_pipeline_and_watch_reports(ray_local: str, client: Any, tmp_path: Path) -> None:
    pb, _ = client
    cfg = config(tmp_path, steps=10**6)
    control = RunControl()
    ingest = start_ingest(cfg, control)
    streams, frames = 5, 21  # 10 clips of 3 frames per stream
    try:
        s = stub(client, ingest.server.address)
        watched: list[Any] = []
        watch = s.Watch(pb.WatchRequest(interval_s=0.2), metadata=AUTH)
        def follow() -> None:
            try:
                watched.extend(watch)
            except grpc.RpcError:
                pass  # cancelled below

        threading.Thread(target=follow, daemon=True).start()
        replies: list[Any] = []
        pushers = [threading.Thread(target=lambda i=i: replies.append(
            s.Push(stream_frames(pb, f"cam{i}", frames, seed=i), metadata=AUTH))) for i in range(streams)]
        for t in pushers:
            t.start()

        def stop_when_all_trained(m: int) -> None:
            if not any(t.is_alive() for t in pushers) and len(ingest.buffer) == 0:
                control.request_stop()

        recorder = Recorder(stop_when_all_trained)
        spec = cfg.learner_spec((3, SIZE, SIZE))
        result = run_ray(cfg, spec, ingest.source, recorder, store=ingest.source.store, control=control)
        watch.cancel()
    finally:
        ingest.stop()
    assert result.stopped_at is not None and recorder.steps == list(range(result.stopped_at))
    assert all(r.accepted == frames and r.rejected == 0 for r in replies), replies
    assert ingest.source.assignments is not None
    per_stream = assert_each_clip_once(ingest.source.assignments, cfg.clip_len)
    assert per_stream == {f"cam{i}": (frames - 1) // (cfg.clip_len - 1) for i in range(streams)}
    final = ingest.source.store.load_latest()
    assert final is not None and all(lg.exactly_once(result.stopped_at) for lg in final.ledgers)
    assert watched and max(w.frames_in for w in watched) == streams * frames
    assert max(w.micro_batches for w in watched) >= 1 and max(w.streams for w in watched) == streams
    # every micro-batch's clips come from distinct streams while several streams are fresh
    for b in ingest.source.wal.sizes:
        record = ingest.source.wal.read(b)
        assert len(set(record["streams"][:record["fresh"]])) == record["fresh"]


def test_a_stage_killed_mid_stream_loses_and_duplicates_nothing(ray_local: str, client: Any, tmp_path: Path) -> None:
    pb, _ = client
    cfg = config(tmp_path, steps=16, checkpoint_every=3)
    ingest = start_ingest(cfg, buffer_clips=8)
    stop_pushing = threading.Event()

    def endless(i: int) -> Iterator[Any]:
        pixels = video(4, seed=i)
        n = 0
        while not stop_pushing.is_set():
            yield raw(pb, f"cam{i}", n, pixels[n % 4], label=i)
            n += 1

    s = stub(client, ingest.server.address)
    calls = [s.Push.future(endless(i), metadata=AUTH) for i in range(4)]
    source = Recording(ingest.source)
    spec = cfg.learner_spec((3, SIZE, SIZE))
    kills: list[int] = []
    try:
        with StageActors(cfg, spec) as actors:
            pipe = RayPipeline(actors, ingest.source.store)

            def kill(m: int) -> None:
                if m in (5, 10):
                    kills.append(m)
                    ray.kill(actors.handles[m % 2])

            pipe.train(source, 0, cfg.steps, Recorder(kill))
            states, ledgers = pipe.states(), pipe.ledgers()
            recoveries = pipe.recovery.count if pipe.recovery else 0
    finally:
        stop_pushing.set()
        for c in calls:  # a producer held back by flow control is not asking for frames: end its call
            c.cancel()
        ingest.stop()
    assert kills == [5, 10] and recoveries >= 1
    replayed = [m for m in set(source.asked) if source.asked.count(m) > 1]
    assert replayed and source.differing == [], (source.asked, source.differing)  # replays came from the log
    assert ingest.source.replays == len(source.asked) - len(source.first)
    assert all(lg.exactly_once(cfg.steps) for lg in ledgers), ledgers
    assert ingest.source.assignments is not None and sorted(ingest.source.assignments) == list(range(cfg.steps))
    assert_each_clip_once(ingest.source.assignments, cfg.clip_len, tail=8)  # the buffer's 8 clips
    assert state_differences(states, replayed_sequentially(cfg, source.first)) == []
    # the log is truncated behind the checkpoints: after the final one it holds nothing
    assert ingest.source.store.latest_complete() == cfg.steps and ingest.source.wal.sizes == {}


# -- bad input ------------------------------------------------------------------------------------------


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_every_bad_input_gets_its_reason_and_the_stream_goes_on(client: Any, tmp_path: Path) -> None:
    pb, _ = client
    cfg = config(tmp_path)
    ingest = start_ingest(cfg, buffer_clips=100)
    px = video(20, seed=0)
    try:
        s = stub(client, ingest.server.address)
        frames = [
            raw(pb, "a", 0, px[0]), raw(pb, "a", 1, px[1]),
            raw(pb, "a", 1, px[1]),  # duplicate
            raw(pb, "a", 0, px[0]),  # out of order
            pb.Frame(stream="a", index=2, encoding=pb.PNG, data=b"\x89PNG\r\n\x1a\n not really"),  # undecodable
            raw(pb, "a", 2, video(1, 1, size=12)[0]),  # another size
            pb.Frame(stream="a", index=2, encoding=pb.ENCODING_UNSPECIFIED, data=px[2].tobytes()),  # no encoding
            pb.Frame(stream="a", index=2, encoding=7, data=px[2].tobytes()),  # an encoding from the future
            pb.Frame(stream="a", index=2, encoding=pb.RAW, data=px[2].tobytes()[:-1], shape=[10, 10, 3], dtype="uint8"),
            pb.Frame(stream="a", index=2, encoding=pb.RAW, data=px[2].tobytes(), shape=[10, 10, 3], dtype="int16"),
            pb.Frame(stream="", index=0, encoding=pb.RAW, data=px[2].tobytes(), shape=[10, 10, 3], dtype="uint8"),
            pb.Frame(stream="a", index=2, encoding=pb.PNG, data=png(px[2])),  # fine, as PNG
            raw(pb, "a", 3, px[3]),  # clip [0, 1, 2] was completed by frame 2; [2, 3] waits
            raw(pb, "a", 7, px[7]),  # a gap: frame 3's pair with 2 is lost (1 frame unused)
            raw(pb, "a", 8, px[8]),
            raw(pb, "a", 12, px[12]),  # a gap: [7, 8] unfinished (2 frames unused)
            raw(pb, "a", 13, px[13]),  # the stream stops mid-clip: [12, 13] wait
        ]
        reply = s.Push(iter(frames), metadata=AUTH)
        later = s.Push(iter([raw(pb, "a", 14, px[14])]), metadata=AUTH)  # a later call completes that clip
    finally:
        ingest.stop()
    reasons = [(r.index, pb.Reason.Name(r.reason)) for r in reply.rejections]
    assert reasons == [(1, "DUPLICATE"), (0, "OUT_OF_ORDER"), (2, "UNDECODABLE"), (2, "SIZE_MISMATCH"),
                       (2, "UNKNOWN_ENCODING"), (2, "UNKNOWN_ENCODING"), (2, "UNDECODABLE"), (2, "UNKNOWN_ENCODING"),
                       (0, "BAD_STREAM"), (7, "GAP"), (12, "GAP")], reasons
    messages = [r.message for r in reply.rejections]
    assert "frame 1 again" in messages[0] and "frame 0 after frame 1" in messages[1]
    assert "not a readable PNG" in messages[2]
    assert "12x12x3, the stream's frames are 10x10x3" in messages[3]
    assert "needs 300 bytes, the frame has 299" in messages[6] and "'int16'" in messages[7]
    assert reply.accepted == 8 and reply.rejected == 9
    a = {st.stream: st for st in reply.streams}["a"]
    assert (a.accepted, a.clips, a.next_index, a.pending, a.unused) == (8, 1, 14, 2, 3), a
    b = later.streams[0]
    assert (b.accepted, b.clips, b.next_index, b.pending) == (1, 1, 15, 0), b
    assert [(c.stream, c.start) for c in ingest.buffer._queue] == [("a", 0), ("a", 12)]


def test_oversized_busy_and_disconnected_calls_leave_the_others_going(client: Any, tmp_path: Path) -> None:
    pb, _ = client
    ingest = start_ingest(config(tmp_path), buffer_clips=100, max_message_mb=0.01)  # 10 KB messages at most
    held = threading.Event()
    try:
        s = stub(client, ingest.server.address)

        def held_open(stream: str, n: int) -> Iterator[Any]:
            yield from stream_frames(pb, stream, n, seed=1)
            held.wait(30)

        busy = s.Push.future(held_open("c", 4), metadata=AUTH)
        gone = s.Push.future(held_open("d", 4), metadata=AUTH)
        assert _until(lambda: ingest.stats.frames_in == 8)
        gone.cancel()  # the client goes away mid-clip
        with pytest.raises(grpc.RpcError) as big:
            s.Push(iter([raw(pb, "e", 0, video(1, 0, size=100)[0])]), metadata=AUTH)  # 30 KB
        refused = s.Push(stream_frames(pb, "c", 2, seed=2, first=4), metadata=AUTH)
        assert _until(lambda: ingest.stats.active_calls == 1)  # the cancelled call ended on the server
        resumed = s.Push(stream_frames(pb, "d", 3, seed=3, first=4), metadata=AUTH)
        fine = s.Push(stream_frames(pb, "f", 5, seed=4), metadata=AUTH)
        held.set()
        busy_reply = busy.result(timeout=30)
    finally:
        held.set()
        ingest.stop()
    assert big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in big.value.details()
    assert [pb.Reason.Name(r.reason) for r in refused.rejections] == ["STREAM_BUSY"] * 2
    assert "being pushed by another call" in refused.rejections[0].message
    d = resumed.streams[0]
    assert (d.accepted, d.next_index, d.clips, d.pending) == (3, 7, 2, 0), d  # [2 3 4] [4 5 6] after [0 1 2]
    assert fine.accepted == 5 and fine.streams[0].clips == 2 and busy_reply.accepted == 4
    assert "e" not in ingest.server.streams  # the oversized frame changed nothing


def test_a_call_still_pushing_when_the_run_ends_is_told_so(client: Any, tmp_path: Path) -> None:
    """Not an OK reply (the client would take its remaining frames for delivered) and not gRPC's bare
    cancellation at the end of the server's grace: UNAVAILABLE, with what was taken and where to go on."""
    pb, _ = client
    ingest = start_ingest(config(tmp_path), buffer_clips=2)  # nothing consumes: the call soon waits on the buffer
    s = stub(client, ingest.server.address)
    call = s.Push.future(stream_frames(pb, "a", 10_000, seed=5), metadata=AUTH)
    try:
        assert _until(lambda: ingest.stats.frames_in >= 4)
    finally:
        ingest.stop()
    with pytest.raises(grpc.RpcError) as ended:
        call.result(timeout=30)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value
    taken = ingest.stats.frames_in
    assert f"the serve run is ending (its --steps reached, or stopped): {taken} frames of this call were taken" \
        in ended.value.details(), ended.value.details()
    assert "'a' at frame" in ended.value.details()


def _until(predicate: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.05)
    return bool(predicate())


def test_drop_oldest_counts_and_reports_what_it_drops(client: Any, tmp_path: Path) -> None:
    pb, _ = client
    ingest = start_ingest(config(tmp_path), buffer_clips=2, when_full="drop-oldest")
    try:
        reply = stub(client, ingest.server.address).Push(stream_frames(pb, "a", 21, seed=0), metadata=AUTH)
        watched = next(stub(client, ingest.server.address).Watch(pb.WatchRequest(), metadata=AUTH))
    finally:
        ingest.stop()
    assert reply.accepted == 21 and reply.streams[0].clips == 10
    assert reply.dropped_frames == 8 * 2 and watched.dropped_frames == 16  # 8 of 10 clips, 2 new frames each
    assert [c.start for c in ingest.buffer._queue] == [16, 18] and watched.buffered_clips == 2


# -- security -------------------------------------------------------------------------------------------


def test_a_missing_or_wrong_token_is_refused_and_changes_nothing(client: Any, tmp_path: Path) -> None:
    pb, _ = client
    ingest = start_ingest(config(tmp_path))
    try:
        s = stub(client, ingest.server.address)
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
            with pytest.raises(grpc.RpcError) as push:
                s.Push(stream_frames(pb, "a", 5, seed=0), metadata=metadata)
            with pytest.raises(grpc.RpcError) as watch:
                next(s.Watch(pb.WatchRequest(), metadata=metadata))
            assert push.value.code() == watch.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in push.value.details()
        assert (ingest.stats.frames_in, ingest.stats.rejected, ingest.stats.streams, len(ingest.buffer)) == (0, 0, 0, 0)
        assert ingest.server.streams == {}
        assert s.Push(stream_frames(pb, "a", 5, seed=0), metadata=AUTH).accepted == 5
    finally:
        ingest.stop()


def test_tls_with_a_certificate_and_key(client: Any, tmp_path: Path) -> None:
    pb, _ = client
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    ingest = start_ingest(config(tmp_path), tls_cert=str(cert), tls_key=str(key))
    try:
        secure = stub(client, ingest.server.address, grpc.ssl_channel_credentials(root_certificates=cert.read_bytes()))
        assert secure.Push(stream_frames(pb, "a", 5, seed=0), metadata=AUTH).accepted == 5
        with pytest.raises(grpc.RpcError) as plain:
            stub(client, ingest.server.address).Push(stream_frames(pb, "b", 5, seed=0), metadata=AUTH, timeout=5)
        assert plain.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert ingest.stats.frames_in == 5
    finally:
        ingest.stop()


# -- flow control -----------------------------------------------------------------------------------------


def _fast_producer_into_a_slow_pipeline(client: Any, tmp_path: Path, seconds: float) -> None:
    """Frames pushed as fast as the server takes them (32x32, 4 streams), a 3-stage pipeline consuming
    them slower. The buffer stays at its bound, the log at about a checkpoint interval, the driver's
    memory flat (no timing is asserted: only what is held)."""
    pb, _ = client
    cfg = config(tmp_path, layers="conv:8,conv:8,conv:8", steps=10**6, checkpoint_every=4)
    control = RunControl()
    ingest = start_ingest(cfg, control, buffer_clips=8)
    stop = threading.Event()
    sent = [0]

    def endless(i: int) -> Iterator[Any]:
        pixels = video(8, seed=i, size=32)
        n = 0
        while not stop.is_set():
            yield raw(pb, f"cam{i}", n, pixels[n % 8])
            sent[0] += 1
            n += 1

    samples: list[tuple[int, dict]] = []
    process = psutil.Process(os.getpid())

    timer = threading.Timer(seconds, control.request_stop)  # from the first micro-batch on: Ray's start aside

    def watch(m: int) -> None:
        if m == 0:
            timer.start()
        samples.append((process.memory_info().rss, ingest.stats.snapshot()))

    s = stub(client, ingest.server.address)
    calls = [s.Push.future(endless(i), metadata=AUTH) for i in range(4)]
    try:
        run_ray(cfg, cfg.learner_spec((3, SIZE, SIZE)), ingest.source, Recorder(watch), store=ingest.source.store,
                control=control)
    finally:
        timer.cancel()
        stop.set()
        for c in calls:
            c.cancel()
        ingest.stop()
    assert len(samples) >= 8, len(samples)
    assert max(snap["buffered_clips"] for _, snap in samples) <= 8
    assert any(snap["buffered_clips"] == 8 for _, snap in samples)  # the producers were held back at the bound
    # The log is truncated behind the checkpoints: it holds at most a checkpoint interval, the micro-batches
    # in flight (stages x depth), the truncation interval and the one being handed out.
    from pipeline.ingest.source import TRUNCATE_EVERY

    wal = [snap["wal_micro_batches"] for _, snap in samples]
    assert max(wal) <= cfg.checkpoint_every + 3 * cfg.queue_depth + TRUNCATE_EVERY + 2, wal
    taken = ingest.stats.frames_in
    assert sent[0] - taken < 10_000  # the producers were slowed down, not buffered (a few flow-control windows)
    rss = [r for r, _ in samples]
    half = len(rss) // 2
    print(f"fast producer, {seconds:g} s: {len(samples)} micro-batches, {taken} frames taken ({sent[0]} sent), "
          f"buffer max {max(s['buffered_clips'] for _, s in samples)} clips, log max {max(wal)} micro-batches, "
          f"driver RSS max {max(rss[:half]) / 2**20:.0f} MiB in the first half, {max(rss[half:]) / 2**20:.0f} MiB "
          f"in the second")
    assert max(rss[half:]) - max(rss[:half]) < 64 << 20, (max(rss[:half]), max(rss[half:]))  # bytes


def test_a_fast_producer_into_a_slow_pipeline_keeps_memory_flat(ray_local: str, client: Any, tmp_path: Path) -> None:
    _fast_producer_into_a_slow_pipeline(client, tmp_path, seconds=12)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_fast_producer_for_a_minute_keeps_memory_flat(ray_local: str, client: Any, tmp_path: Path) -> None:
    _fast_producer_into_a_slow_pipeline(client, tmp_path, seconds=60)


# -- negatives of a single stream --------------------------------------------------------------------------


def test_a_single_stream_takes_negatives_far_apart_in_time() -> None:
    """One stream, B = 16 clips of T = 8 per micro-batch, the default gap (4T = 32 frames) and memory: the
    first micro-batches relax the gap (nothing far enough has arrived yet), then every clip of a
    micro-batch is at least 32 frames from every other, and each fresh clip is trained on once, in order."""
    from pipeline.ingest.buffer import ClipBuffer
    from pipeline.ingest.clips import Cutter

    B, T, gap, frames = 16, 8, 32, 3000
    buffer = ClipBuffer(B, capacity=64, memory=256, gap=gap, linger=0.0)
    cutter = Cutter("one", 0, T)
    pixel = np.zeros((1, 2, 2), np.uint8)

    def produce() -> None:
        for i in range(frames):
            clip, _ = cutter.take(i, (2, 2, 1), pixel, -1, 0.0)
            if clip is not None:
                buffer.put(clip)

    producer = threading.Thread(target=produce)
    producer.start()
    formed, gaps, fresh = [], [], []
    done = [False]
    while not (done[0] and len(buffer) == 0):
        # The pipeline as slower than the producer, its steady state: each micro-batch is formed from a full
        # buffer. (Formed whenever the thread scheduler lets this loop run ahead, one could find the producer
        # descheduled and relax mid-stream: on a loaded 2-core machine it did, once.)
        while producer.is_alive() and len(buffer) < buffer.capacity:
            time.sleep(0.001)
        done[0] = not producer.is_alive()
        f = buffer.form(len(formed), stopping=lambda: done[0])
        if f is None:
            break
        formed.append(f)
        starts = sorted(c.start for c in f.clips)
        gaps.append(min(b - a for a, b in itertools.pairwise(starts)))
        fresh += [c.start for c in f.clips[:f.fresh]]
    producer.join()
    assert sorted(fresh) == [k * (T - 1) for k in range((frames - 1) // (T - 1))]  # each clip once
    relaxed = [i for i, g in enumerate(gaps) if g < gap]
    assert relaxed == list(range(len(relaxed))) and len(relaxed) < 10, relaxed  # only a warm-up relaxes it
    assert min(gaps) >= T, gaps  # and even then no two clips of a micro-batch share a frame
    print(f"single stream: {len(formed)} micro-batches, {len(relaxed)} with a relaxed gap "
          f"(min {min(gaps)} frames), the rest >= {gap}")


# -- the commands ---------------------------------------------------------------------------------------------


def test_lamina_serve_and_push_from_the_command_line(tmp_path: Path) -> None:
    """`lamina serve` (its own local Ray) fed by `lamina push`, then SIGTERM: a clean end after a final
    checkpoint, every micro-batch in every ledger once, RUN_DIR/ingest.json gone."""
    import signal

    from pipeline.checkpoints import CheckpointStore

    root = Path(__file__).resolve().parents[1]
    data = tmp_path / "videos.npz"
    np.savez(data, frames=np.random.default_rng(0).integers(0, 256, (6, 40, 12, 12), dtype=np.uint8),
             labels=np.arange(6))
    (tmp_path / "token").write_text(TOKEN + "\n")
    run_dir = tmp_path / "run"
    serve = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--layers", "conv:4,conv:4", "--size",
                              "8", "--clips", "4", "--clip-len", "3", "--steps", "100000", "--checkpoint-every", "5",
                              "--channels", "1", "--token-file", str(tmp_path / "token"), "--run-dir", str(run_dir)],
                             cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _until(lambda: (run_dir / "ingest.json").is_file() or serve.poll() is not None, timeout=120)
        info = __import__("json").loads((run_dir / "ingest.json").read_text())
        assert info["address"].startswith("127.0.0.1:") and "token" not in info  # the token was given: not copied
        assert (run_dir / "ingest.json").stat().st_mode & 0o777 == 0o600
        push = subprocess.run([sys.executable, "-m", "pipeline.cli", "push", f"npz:{data}", "--to", info["address"],
                               "--token-file", str(tmp_path / "token"), "--size", "10", "--encoding", "png"],
                              check=False, cwd=root, capture_output=True, text=True, timeout=120)
        assert push.returncode == 0, push.stderr
        assert "6 stream(s): 240 frames taken, 0 refused, 114 clips queued" in push.stdout, push.stdout
        store = CheckpointStore(str(run_dir / "checkpoints"))
        assert _until(lambda: (store.latest_complete() or 0) >= 20, timeout=120)
        serve.send_signal(signal.SIGTERM)
        out, err = serve.communicate(timeout=120)
    finally:
        if serve.poll() is None:
            serve.kill()
    assert serve.returncode == 0, err[-3000:]
    assert "ingest listening on 127.0.0.1:" in out and "stopped after" in out
    final = store.load_latest()
    assert final is not None and final.step >= 20
    assert all(lg.exactly_once(final.step) for lg in final.ledgers)
    assert not (run_dir / "ingest.json").exists()


@pytest.mark.slow  # a minute: two `lamina serve` processes, each starting its own Ray
def test_a_killed_serve_driver_resumes_from_its_log(tmp_path: Path) -> None:
    """SIGKILL the `lamina serve` driver mid-stream; `lamina serve --resume` replays the micro-batches its log
    holds beyond the last checkpoint, then trains on new frames: every ledger shows each micro-batch once."""
    import json
    import signal

    from pipeline.checkpoints import CheckpointStore

    root = Path(__file__).resolve().parents[1]
    data = tmp_path / "videos.npz"
    np.savez(data, frames=np.random.default_rng(0).integers(0, 256, (6, 40, 8, 8), dtype=np.uint8),
             labels=np.arange(6))
    env = {**os.environ, "LAMINA_INGEST_TOKEN": TOKEN}
    run_dir = tmp_path / "run"
    flags = ["--layers", "conv:4,conv:4", "--size", "8", "--clips", "4", "--clip-len", "3", "--checkpoint-every",
             "10", "--channels", "1", "--buffer-clips", "4"]

    def serve(*extra: str) -> subprocess.Popen:
        (run_dir / "ingest.json").unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", *extra], cwd=root, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if not _until(lambda: (run_dir / "ingest.json").is_file() or proc.poll() is not None, timeout=120):
            proc.kill()
        assert (run_dir / "ingest.json").is_file(), proc.communicate()[1][-3000:]
        return proc

    def push(proc: subprocess.Popen, prefix: str) -> subprocess.Popen:
        address = json.loads((run_dir / "ingest.json").read_text())["address"]
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "push", f"npz:{data}", "--to", address,
                                 "--size", "8", "--loops", "50", "--prefix", prefix], cwd=root, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    store = CheckpointStore(str(run_dir / "checkpoints"))
    first = serve(*flags, "--steps", "100000", "--run-dir", str(run_dir))
    producer = push(first, "a")
    try:
        assert _until(lambda: (store.latest_complete() or 0) >= 20, timeout=120), store.steps()
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    finally:
        for p in (first, producer):
            if p.poll() is None:
                p.kill()
        producer.wait(timeout=60)
    logged = sorted(int(p.name[3:12]) for p in (run_dir / "checkpoints" / "ingest-wal").glob("mb-*.state"))
    latest = store.latest_complete()
    assert latest is not None and logged and logged[-1] >= latest, (latest, logged)  # admitted, not checkpointed
    steps = latest + 30
    second = serve("--resume", str(run_dir), "--steps", str(steps))
    producer = push(second, "b")
    try:
        _, err = second.communicate(timeout=180)
    finally:
        for p in (second, producer):
            if p.poll() is None:
                p.kill()
        producer.wait(timeout=60)
    assert second.returncode == 0, err[-3000:]
    assert f"ingest log: micro-batches {logged[0]}..{logged[-1]} written before the restart" in err
    final = store.load_latest()
    assert final is not None and final.step == steps and all(lg.exactly_once(steps) for lg in final.ledgers)


# -- metrics ---------------------------------------------------------------------------------------------------


def test_the_ingest_gauges_reach_prometheus(ray_local: str, client: Any, tmp_path: Path) -> None:
    """The ingest's numbers are Ray gauges like the stages' (`ray_lamina_ingest_*`, tagged with the run)."""
    import re
    import urllib.request

    pb, _ = client
    cfg = config(tmp_path)
    ingest = start_ingest(cfg)
    run = Path(cfg.run_dir).name
    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"
    series: dict[str, float] = {}

    def scrape() -> bool:
        with urllib.request.urlopen(url, timeout=5) as page:
            text = page.read().decode()
            for name, tags, value in re.findall(r"^ray_lamina_ingest_(\w+)\{([^}]*)\} (\S+)$", text, re.MULTILINE):
                if f'run="{run}"' in tags:
                    series[name] = float(value)
        return series.get("rejected_frames") == 2 and series.get("buffered_clips") == 2

    try:
        frames = [*stream_frames(pb, "a", 5, seed=0), raw(pb, "a", 1, video(1, 0)[0]), raw(pb, "a", 2, video(1, 0)[0])]
        reply = stub(client, ingest.server.address).Push(iter(frames), metadata=AUTH)
        found = wait_until(scrape, timeout=40, every=1.0)
    finally:
        ingest.stop()
    assert reply.accepted == 5 and reply.rejected == 2
    assert found, series
    assert {"frames_per_s", "lag_s", "buffered_bytes", "wal_bytes", "wal_micro_batches", "dropped_frames"} <= set(series)


def test_push_sends_every_frame_of_a_video_folder(shared_data: Path) -> None:
    """`lamina push video:DIR` streams each video whole, decoded a segment at a time, in order."""
    from pipeline.ingest.push import streams_of
    from pipeline.sources.video import open_videos

    spec = f"{shared_data / 'video' / 'asl_gestures'},labels=stem"
    streams = streams_of(f"video:{spec}", 16)
    opened = open_videos(spec, 16)
    assert [len(s.frames) for s in streams] == opened.catalog.lengths.tolist() and len(streams) == 20
    last = len(streams[3].frames) - 1
    whole = np.stack([streams[3].frames[i] for i in range(last + 1)])  # in order, as a push reads them
    assert whole.shape == (last + 1, 16, 16, 3) and whole.dtype == np.uint8
    piece = opened.reader.pieces(3, last, last + 1)[0]
    assert np.array_equal(whole[last], dict(opened.reader.load(piece.key))[piece.key].frames[piece.lo])
    (one,) = streams_of(f"video:{spec}", 16, one_stream=True)
    assert len(one.frames) == sum(opened.catalog.lengths) and np.array_equal(one.frames[len(streams[0].frames)],
                                                                              streams[1].frames[0])


def test_raw_png_and_jpeg_frames_arrive_as_the_same_pixels(client: Any, tmp_path: Path) -> None:
    """The same frames pushed RAW, as PNG (lossless: the same bytes) and as JPEG (close), grey RAW widened."""
    from PIL import Image

    pb, _ = client
    ingest = start_ingest(config(tmp_path), buffer_clips=10)
    y, x = np.mgrid[0:32, 0:32]  # a smooth 32x32 picture (JPEG keeps it close), resized to the run's 8x8
    px = np.stack([x * 8, y * 8, (x + y) * 4], axis=-1).astype(np.uint8)

    def jpeg(pixels: np.ndarray) -> bytes:
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="JPEG", quality=95, subsampling=0)
        return out.getvalue()

    try:
        s = stub(client, ingest.server.address)
        for stream, make in (("raw", lambda i: raw(pb, "raw", i, px)),
                             ("png", lambda i: pb.Frame(stream="png", index=i, encoding=pb.PNG, data=png(px))),
                             ("jpeg", lambda i: pb.Frame(stream="jpeg", index=i, encoding=pb.JPEG, data=jpeg(px))),
                             ("grey", lambda i: raw(pb, "grey", i, px[..., :1]))):
            assert s.Push(iter([make(i) for i in range(3)]), metadata=AUTH).streams[0].clips == 1, stream
    finally:
        ingest.stop()
    clips = {c.stream: c.frames.astype(np.int16) for c in ingest.buffer._queue}
    assert np.array_equal(clips["raw"], clips["png"]) and clips["raw"].shape == (3, 3, SIZE, SIZE)
    assert np.abs(clips["jpeg"] - clips["raw"]).max() <= 4
    assert np.array_equal(clips["grey"], np.repeat(clips["raw"][:, :1], 3, axis=1))
