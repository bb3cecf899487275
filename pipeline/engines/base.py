"""What every engine is: its contract, its result, and the two chores every driver loop shares.

An engine trains micro-batches [start, cfg.steps) of a source through the network, driving a
`pipeline.schedule.Schedule`, and calls `on_step(m, reports)` once per micro-batch, in order of m, with one
`StepReport` per stage. With a checkpoint store it takes the schedule's barriers (a barrier that cannot be
written is reported to its `BarrierHealth`, which stops the run only after several in a row), and it stops
early (after a final barrier) when its `RunControl` asks. It writes nothing else: what it learned and
where it stopped come back as an `EngineResult`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pipeline.checkpoints import Checkpoint, CheckpointStore, Part
from pipeline.config import TrainConfig
from pipeline.control import RunControl
from pipeline.errors import CheckpointError
from pipeline.schedule import Schedule
from pipeline.sources import Source
from pipeline.stage import StepReport
from workers.learner import LearnerSpec

logger = logging.getLogger(__name__)

OnStep = Callable[[int, list[StepReport]], None]


@dataclass(frozen=True)
class EngineResult:
    states: list[dict]  # every learner's state, bottom to top, as the run ended
    stopped_at: int | None  # micro-batches applied when a stop request ended the run early; None: finished
    recoveries: int = 0  # lost stages recovered from (the Ray engine)


class BarrierHealth:
    """How a run takes barriers that cannot be written (a full disk, a store that went away): each failure
    is reported and training goes on from the last complete checkpoint's protection; more than `tolerable`
    failures in a row stop the run (Flink's tolerable checkpoint failures). 0: the first failure stops it."""

    def __init__(self, tolerable: int = 0) -> None:
        self.tolerable = tolerable
        self.failed = 0  # barriers that could not be written, in all
        self.in_a_row = 0  # ... since the last one that was

    def succeeded(self) -> None:
        self.in_a_row = 0

    def fail(self, step: int, error: CheckpointError) -> None:
        """Checkpoint `step` could not be written; raise when that is one failure too many."""
        self.failed += 1
        self.in_a_row += 1
        if self.in_a_row > self.tolerable:
            raise CheckpointError(f"{self.in_a_row} checkpoint(s) in a row could not be written, the last "
                                  f"({step}): {error} (--tolerable-checkpoint-failures {self.tolerable})") from error
        logger.warning("checkpoint %d could not be written (%d in a row, %d tolerated): %s; training goes on",
                       step, self.in_a_row, self.tolerable, error)


def commit(store: CheckpointStore, m: int, parts: list[Part | CheckpointError], health: BarrierHealth) -> None:
    """Mark the barrier after micro-batch m complete (checkpoint m + 1), or report to `health` why not."""
    try:
        failed = [p for p in parts if isinstance(p, CheckpointError)]
        if failed:
            raise failed[0]
        store.commit(m + 1, [p for p in parts if isinstance(p, Part)])
    except CheckpointError as e:
        health.fail(m + 1, e)
    else:
        health.succeeded()


class Engine(Protocol):
    def __call__(self, cfg: TrainConfig, spec: LearnerSpec, source: Source, on_step: OnStep, *,
                 resume: Checkpoint | None = None, store: CheckpointStore | None = None,
                 control: RunControl | None = None, health: BarrierHealth | None = None) -> EngineResult: ...


def make_schedule(cfg: TrainConfig, stages: int, depth: int, start: int, stop: int,
                  store: CheckpointStore | None) -> Schedule:
    """The schedule of micro-batches [start, stop); one barrier policy for every engine: with a store, a
    barrier every --checkpoint-every, on request and at the end, and an initial one unless a complete
    checkpoint of that very state exists (a fresh run, not a resume or a recovery)."""
    return Schedule(stages, depth, start, stop, every=cfg.checkpoint_every, checkpoints=store is not None,
                    initial=store is not None and store.record(start) is None)


def follow_requests(control: RunControl | None, schedule: Schedule) -> None:
    """Hand the control's requests to the schedule; called between any two actions."""
    if control is None:
        return
    if control.take_checkpoint_request():
        schedule.request_checkpoint()
    if control.stop_requested and schedule.request_stop():
        logger.warning("stop requested: finishing the micro-batches handed out (up to %d), then a checkpoint",
                       schedule.stopped_at)


class Reports:
    """Collects the stages' reports and calls on_step(m, reports) once every stage reported m, in order.
    Micro-batches below `seen` are not passed on again (a replay after a recovery reports them twice)."""

    def __init__(self, stages: int, on_step: OnStep, seen: int) -> None:
        self.stages, self.on_step, self.seen = stages, on_step, seen
        self._partial: dict[int, list[StepReport]] = {}

    def add(self, report: StepReport) -> None:
        got = self._partial.setdefault(report.micro_batch, [])
        assert report.stage == len(got), (report.stage, len(got))  # the schedule waits bottom to top
        got.append(report)
        if len(got) == self.stages:
            del self._partial[report.micro_batch]
            if report.micro_batch >= self.seen:
                assert report.micro_batch == self.seen, (report.micro_batch, self.seen)
                self.on_step(report.micro_batch, got)
                self.seen += 1

    def restart(self) -> None:
        """Forget partial micro-batches (a recovery abandons them)."""
        self._partial.clear()
