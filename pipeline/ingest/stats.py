"""What the ingest counts, for the Watch rpc and for Ray's metrics (the dashboard, Prometheus, Grafana).

One `IngestStats` per server, updated under a lock by the Push handlers and by the live source. `publish`
runs a thread that sets `ray.util.metrics` gauges from it every second, in the driver process, tagged `run`
like the driver's own gauges (pipeline/telemetry/gauges.py):

    lamina_ingest_frames_per_s      frames taken per second (over the last second)
    lamina_ingest_lag_s             capture -> training: age of the newest frame of the last micro-batch
                                    formed, when it was handed to the pipeline
    lamina_ingest_buffered_clips    clips waiting in the bounded buffer
    lamina_ingest_buffered_bytes    their pixel bytes
    lamina_ingest_wal_bytes         the write-ahead log's size (since the last complete checkpoint)
    lamina_ingest_wal_micro_batches micro-batches in it
    lamina_ingest_dropped_frames    frames dropped by --when-full drop-oldest
    lamina_ingest_rejected_frames   frames refused (bad input)
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.checkpoints import CheckpointStore
    from pipeline.ingest.buffer import ClipBuffer, Formed
    from pipeline.ingest.wal import WriteAheadLog

logger = logging.getLogger(__name__)

GAUGES = {
    "frames_per_s": "frames the live ingest took per second",
    "lag_s": "seconds from capture of the newest frame of a micro-batch to its hand-over to the pipeline",
    "buffered_clips": "clips waiting in the ingest's bounded buffer",
    "buffered_bytes": "pixel bytes of the clips waiting in the ingest's buffer",
    "wal_bytes": "bytes of the ingest's write-ahead log",
    "wal_micro_batches": "micro-batches in the ingest's write-ahead log",
    "dropped_frames": "frames dropped by --when-full drop-oldest",
    "rejected_frames": "pushed frames refused (bad input)",
}


class IngestStats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = time.time()
        self.frames_in = 0
        self.rejected = 0
        self.streams = 0
        self.active_calls = 0
        self.micro_batches = 0
        self.lag_s = 0.0
        self.buffer: ClipBuffer | None = None
        self.wal: WriteAheadLog | None = None
        self.store: CheckpointStore | None = None
        self._rate = (time.monotonic(), 0, 0.0)  # (when, frames_in then, rate)

    def attach(self, buffer: ClipBuffer, wal: WriteAheadLog, store: CheckpointStore) -> None:
        self.buffer, self.wal, self.store = buffer, wal, store

    def formed(self, formed: Formed, now: float) -> None:
        captured = max((c.captured for c in formed.clips[:formed.fresh]), default=0.0)
        with self.lock:
            self.micro_batches += 1
            if captured > 0:
                self.lag_s = max(0.0, now - captured)

    def frames_per_s(self) -> float:
        """Over the time since the last call at least 0.5 s ago (the rate is held in between)."""
        with self.lock:
            when, count, rate = self._rate
            now = time.monotonic()
            if now - when >= 0.5:
                rate = (self.frames_in - count) / (now - when)
                self._rate = (now, self.frames_in, rate)
            return rate

    def snapshot(self) -> dict[str, Any]:
        """Every number, as the Watch rpc's IngestMetrics fields."""
        rate = self.frames_per_s()
        buffer, wal = self.buffer, self.wal
        last = -1
        if self.store is not None:
            try:
                latest = self.store.latest_complete()
                last = -1 if latest is None else latest
            except OSError:
                pass
        with self.lock:
            return {"time": time.time(), "frames_in": self.frames_in, "frames_per_s": rate,
                    "rejected": self.rejected,
                    "dropped_frames": buffer.dropped_frames if buffer else 0,
                    "buffered_clips": len(buffer) if buffer else 0, "buffered_bytes": buffer.bytes if buffer else 0,
                    "wal_micro_batches": len(wal.sizes) if wal else 0, "wal_bytes": wal.bytes if wal else 0,
                    "micro_batches": self.micro_batches, "lag_s": self.lag_s, "last_checkpoint": last,
                    "streams": self.streams, "active_calls": self.active_calls}

    def publish(self, run_id: str, every: float = 1.0) -> threading.Event:
        """Set the Ray gauges every `every` seconds from a daemon thread (once Ray is up); set the returned
        event to end it."""
        done = threading.Event()

        def loop() -> None:
            gauges: dict[str, Any] | None = None
            while not done.wait(every):
                try:
                    import ray

                    if not ray.is_initialized():
                        continue
                    if gauges is None:
                        from pipeline.telemetry.gauges import _gauge

                        gauges = {k: _gauge(f"ingest_{k}", text, ("run",), {"run": run_id})
                                  for k, text in GAUGES.items()}
                    snap = self.snapshot()
                    snap["rejected_frames"] = snap["rejected"]
                    for k, gauge in gauges.items():
                        gauge.set(float(snap[k]))
                except Exception as e:  # noqa: BLE001 - metrics must never stop the ingest
                    logger.debug("ingest gauges: %s", e)

        threading.Thread(target=loop, name="ingest-gauges", daemon=True).start()
        return done
