"""The Ray engine: the schedule driven over one actor per stage, activations handed on by a transport.

`run_ray` has the engine contract of pipeline/engines/base.py and, by [Note: channels] in
pipeline/schedule.py, the sequential loop's result bit for bit on the cpu. `RayPipeline` is the driver
loop: it executes the schedule's actions over the stage actors that pipeline/engines/placement.py placed,
and hands lost stages to pipeline/engines/recovery.py ([Note: recovery]).

    0S m   a0, r0 = stage0.step(m, frames_m)      frames: driver -> object store (one copy)
    1S m   a1, r1 = stage1.step(m, a0)            a0: stage 0 -> object store -> stage 1, zero-copy read
    2S m   _,  r2 = stage2.step(m, a1, emit=False) the top stage's output is not needed: not stored
    kW m   the driver takes r_k (metrics, busy interval); it never touches an activation

Ray starts stage 1's call as soon as a0 is sealed, without a round trip through the driver. A stage actor
runs one caller's calls in submission order (max_concurrency 1, no task retries), so every stage sees
m, m+1, ... in order, and a stage emits the output of the same forward it learned from
(workers/learner.py): every stage applies the sequential loop's updates, in its order, to the same inputs.
That diagram is the object-store transport (--transport object-store); the driver loop below only speaks
to the seam in pipeline/engines/transport.py, whose other transports keep the same order.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import ray
import torch

from pipeline.checkpoints import Checkpoint, CheckpointStore, Ledger
from pipeline.config import TrainConfig
from pipeline.control import RunControl
from pipeline.engines.actors import get
from pipeline.engines.base import (
    BarrierHealth,
    EngineResult,
    OnStep,
    Reports,
    commit,
    follow_requests,
    make_schedule,
)
from pipeline.engines.cluster import connect
from pipeline.engines.placement import StageActors, cpus_needed
from pipeline.engines.recovery import MAX_RECOVERIES, Recovery
from pipeline.errors import CheckpointError, StageLost
from pipeline.schedule import Commit, Schedule, Snapshot, Step, Wait
from pipeline.sources import Source
from pipeline.telemetry.gauges import DriverGauges
from workers.learner import LearnerSpec

logger = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 60.0  # on an interrupt, how long to let checkpoint writes in flight finish before killing
POLL_S = 0.5  # while waiting for a stage, the driver looks at stop / checkpoint requests this often


def run_ray(cfg: TrainConfig, spec: LearnerSpec, source: Source, on_step: OnStep, *,
            resume: Checkpoint | None = None, store: CheckpointStore | None = None,
            control: RunControl | None = None, health: BarrierHealth | None = None) -> EngineResult:
    """Train micro-batches [resume step or 0, cfg.steps) through one Ray actor per stage."""
    connect(cfg.address, cpus_needed(cfg), cfg.connect_timeout)
    with StageActors(cfg, spec) as actors:
        pipe = RayPipeline(actors, store, control, health)
        start = 0
        if resume is not None:
            pipe.load(resume)
            start = resume.step
        stopped = pipe.train(source, start, cfg.steps, on_step)
        return EngineResult(pipe.states(), stopped, pipe.recovery.count if pipe.recovery else 0)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """The driver's own torch work while it drives (a source gathering micro-batch m) on one thread. With
    more, OpenMP's workers spin after every parallel op, waiting for the next: ~10 ms of a core per
    micro-batch taken from the stages on the bench's network, for a gather that takes 0.2 ms (PERFLOG,
    2026-11-30 M6)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class RayPipeline:
    """The driver loop over placed stage actors: micro-batches in, reports out, barriers, recovery."""

    def __init__(self, actors: StageActors, store: CheckpointStore | None = None,
                 control: RunControl | None = None, health: BarrierHealth | None = None) -> None:
        self.actors, self.store, self.control = actors, store, control
        self.cfg = actors.cfg
        self.health = health or BarrierHealth(self.cfg.tolerable_checkpoint_failures)
        self.recovery = Recovery(actors, store) if store is not None else None
        self.gauges = DriverGauges(actors.run_id)

    def load(self, checkpoint: Checkpoint) -> None:
        """Give each stage its learners' states and ledger (a resume)."""
        states, ledgers = checkpoint.learners, checkpoint.ledgers
        if len(states) != sum(last - first for first, last in self.actors.ranges):
            raise CheckpointError(f"checkpoint {checkpoint.step} holds {len(states)} learner states; this network "
                                  f"has {self.actors.ranges[-1][1]} layers")
        for attempt in range(MAX_RECOVERIES + 1):
            try:  # a stage that dies meanwhile is replaced, and every stage loads again
                if attempt:
                    self.actors.replace_dead()
                refs = [a.load.remote(states[first:last], ledgers[first].ranges if ledgers else None)
                        for a, (first, last) in zip(self.actors.handles, self.actors.ranges, strict=True)]
                for k, ref in enumerate(refs):
                    get(ref, k, None, self.actors.names[k])
                return
            except StageLost as e:
                if attempt == MAX_RECOVERIES:
                    raise
                logger.warning("%s while loading the checkpoint; replacing it", e)

    def train(self, source: Source, start: int, stop: int, on_step: OnStep) -> int | None:
        """Drive micro-batches [start, stop) through the stages; returns where a stop request ended the run
        (None: it finished). With a store, lost stages are recovered ([Note: recovery])."""
        reports = Reports(len(self.actors), on_step, start)
        segment = start
        with one_torch_thread():
            while True:
                schedule = make_schedule(self.cfg, len(self.actors), self.cfg.queue_depth, segment, stop, self.store)
                try:
                    self._drive(schedule, source, reports)
                    return schedule.stopped_at
                except StageLost as e:
                    if self.recovery is None:
                        raise
                    reports.restart()
                    segment = self.recovery.recover(e, reports.seen)

    def _drive(self, schedule: Schedule, source: Source, reports: Reports) -> None:
        transport, n = self.actors.transport, len(self.actors)
        done = [schedule.start] * n  # per stage, micro-batches reported
        transport.begin(self.store)
        try:
            follow_requests(self.control, schedule)
            for action in schedule:
                if isinstance(action, Step):
                    k, m = action.stage, action.m
                    transport.step(k, m, source.batch(m).frames.numpy() if k == 0 else None)
                elif isinstance(action, Snapshot):
                    transport.snapshot(action.stage, action.m)
                elif isinstance(action, Wait):
                    k, m = action.stage, action.m
                    reports.add(transport.report(k, m, lambda refs: self._wait(refs, schedule)))
                    done[k] = m + 1
                    self.gauges.queue_depths(h - d for h, d in zip(schedule.handed, done, strict=True))
                elif isinstance(action, Commit):
                    assert self.store is not None
                    parts = transport.parts(action.m, lambda refs: self._wait(refs, schedule))
                    commit(self.store, action.m, parts, self.health)
                    self.gauges.run_counts(self.recovery.count if self.recovery else 0, self.health.failed)
                follow_requests(self.control, schedule)  # before the schedule decides its next action
        except KeyboardInterrupt:
            if self.control is not None and self.control.stop_requested:
                logger.warning("interrupted again: exiting without draining")
            else:
                self._drain(transport.in_flight_parts())
            raise
        finally:
            transport.abandon()

    def _wait(self, refs: list[Any], schedule: Schedule) -> None:
        """Until every ref is ready; meanwhile follow stop and checkpoint requests (they shape what follows)."""
        while refs:
            _, refs = ray.wait(refs, num_returns=len(refs), timeout=POLL_S)
            follow_requests(self.control, schedule)

    def _drain(self, refs: list[Any]) -> None:
        """Let the checkpoint parts being written finish (bounded by DRAIN_TIMEOUT_S) before the stages are
        killed, so that the store holds no half-written part; the steps in flight are abandoned."""
        if not refs:
            return
        logger.warning("interrupted: draining %d checkpoint writes in flight (up to %gs)", len(refs), DRAIN_TIMEOUT_S)
        try:
            _, left = ray.wait(refs, num_returns=len(refs), timeout=DRAIN_TIMEOUT_S)
        except KeyboardInterrupt:
            logger.warning("interrupted again: not draining")
            return
        if left:
            logger.warning("%d checkpoint writes still running after %gs: killing them", len(left), DRAIN_TIMEOUT_S)

    # -- after training -------------------------------------------------------------------------------

    def states(self) -> list[dict]:
        """Every learner's state, bottom to top. Queued behind the stages' steps, so it is the final state."""
        return [s for states in self._ask_all("states") for s in states]

    def ledgers(self) -> list[Ledger]:
        """Each stage's ledger: the micro-batches its current state has applied."""
        return [Ledger(ranges) for ranges in self._ask_all("get_ledger")]

    def _ask_all(self, method: str) -> list[Any]:
        """One call on every stage. A stage lost after training ended is restored from the last complete
        checkpoint (the final one) and asked again."""
        for attempt in range(2):
            refs = [getattr(a, method).remote() for a in self.actors.handles]
            try:
                return [get(ref, k, None, self.actors.names[k]) for k, ref in enumerate(refs)]
            except StageLost as e:
                latest = self.store.latest_complete() if self.store is not None else None
                if attempt or latest is None or self.recovery is None:
                    raise
                logger.warning("%s; restoring checkpoint %d", e, latest)
                self.recovery.restore(latest)
        raise AssertionError("unreachable")
