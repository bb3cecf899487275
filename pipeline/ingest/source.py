"""The live source: micro-batch m formed from pushed clips once, written ahead, replayed from the log.

The engines ask a source for micro-batch m, in order, and again for the same m after a recovery
(pipeline/sources/source.py). The first time m is asked for, `LiveSource` forms it from the buffer
([Note: live micro-batches] in buffer.py) and writes it to the log ([Note: the ingest write-ahead log] in
wal.py) before handing it out; any later time, it reads it back from the log. So micro-batch m is, for the
engines, the same pure function of m it is for a file, and the checkpoint ledger's exactly-once evidence
holds for the stream too. Every few micro-batches it deletes what the newest complete checkpoint covers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from pipeline.checkpoints import CheckpointStore
from pipeline.errors import DataError
from pipeline.ingest.buffer import ClipBuffer, Formed
from pipeline.ingest.stats import IngestStats
from pipeline.ingest.wal import WriteAheadLog
from pipeline.sources.source import MicroBatch

logger = logging.getLogger(__name__)

TRUNCATE_EVERY = 4  # micro-batches between two looks for a newer complete checkpoint to truncate the log to
# (a listing and a small read of the store: cheap on a disk, a few round trips on object storage). Counted,
# not timed: where barriers fall is the schedule's, so the log's size is too (pipeline/schedule.py).


class LiveSource:
    """A `Source` over a live ingest: `batch(m)` forms micro-batch m from the buffer (waiting for clips) or
    reads it from the write-ahead log."""

    def __init__(self, buffer: ClipBuffer, store: CheckpointStore, frame_shape: tuple[int, int, int],
                 stats: IngestStats | None = None, stopping: Callable[[], bool] = lambda: False,
                 start: int = 0, record_assignments: bool = False) -> None:
        self.name = "live ingest (gRPC)"
        self.frame_shape = frame_shape
        self.buffer, self.store, self.stopping = buffer, store, stopping
        self.stats = stats or IngestStats()
        self.wal = WriteAheadLog(store.fs, store.root)
        logged = [m for m in self.wal.sizes if m >= start]
        self.next_m = max(logged) + 1 if logged else start  # micro-batches below it are in the log
        if logged:
            logger.info("ingest log: %s written before the restart; replayed first", self.wal.span())
        self.replays = 0  # micro-batches read back from the log
        # micro-batch -> its fresh clips (stream, first frame): the exactly-once evidence in tests. Off by
        # default: on an endless run it would grow without bound.
        self.assignments: dict[int, tuple[tuple[str, int], ...]] | None = {} if record_assignments else None
        self._lock = threading.Lock()
        self._calls = 0  # batch() calls, for TRUNCATE_EVERY
        self.stats.attach(buffer, self.wal, store)

    def batch(self, m: int) -> MicroBatch:
        with self._lock:
            if m < self.next_m:
                record = self.wal.read(m)
                self.replays += 1
                logger.info("micro-batch %d replayed from the ingest log", m)
            elif m == self.next_m:
                formed = self.buffer.form(m, self.stopping)
                if formed is None:
                    raise DataError(f"stopped before micro-batch {m} could be formed: fewer than "
                                    f"{self.buffer.B} clips arrived")
                record = _record(m, formed)
                self.wal.append(m, record)  # before the pipeline sees it: write-ahead
                self.next_m += 1
                if self.assignments is not None:
                    self.assignments[m] = tuple((c.stream, c.start) for c in formed.clips[:formed.fresh])
                self.stats.formed(formed, time.time())
            else:
                raise ValueError(f"micro-batch {m} asked for before {self.next_m}: a live source is read in order")
            self._truncate()
        return _micro_batch(record)

    def _truncate(self) -> None:
        self._calls += 1
        if self._calls % TRUNCATE_EVERY == 0:
            self.truncate()

    def truncate(self) -> None:
        """Delete the log's micro-batches below the newest complete checkpoint (it covers them)."""
        try:
            latest = self.store.latest_complete()
        except OSError as e:
            logger.warning("ingest log: cannot read the checkpoint store (%s); not truncating", e)
            return
        if latest is not None and self.wal.truncate(latest):
            logger.debug("ingest log truncated below checkpoint %d: %s left", latest, self.wal.span())


def _record(m: int, formed: Formed) -> dict:
    clips = formed.clips
    return {"m": m, "frames": torch.from_numpy(np.stack([c.frames for c in clips])),
            "labels": torch.from_numpy(np.stack([c.labels for c in clips])),
            "streams": [c.stream for c in clips], "numbers": [c.number for c in clips],
            "starts": [c.start for c in clips], "fresh": formed.fresh, "gap": formed.relaxed_gap,
            "captured": [c.captured for c in clips]}


def _micro_batch(record: dict) -> MicroBatch:
    frames = record["frames"].float().div_(255.0)  # (B, T, C, H, W), as every loader scales
    return MicroBatch(record["m"], frames, tuple(record["numbers"]), tuple(record["starts"]), record["labels"])
