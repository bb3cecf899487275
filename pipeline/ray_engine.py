"""The Ray engine: one actor per stage, activations chained through the object store, bounded channels.

`run_ray` has the contract of pipeline.engines.run_in_process — same arguments, every learner's state
bottom to top, `on_step(m, rows)` once per micro-batch in order of m — and, by [Note: channels],
the same result bit for bit on the cpu. `StagePipeline` is the machinery: placement, the named stage
actors, the driver loop, teardown.

[Note: channels]
The driver never touches an activation. For micro-batch m it submits one call per stage, chaining the
output reference of each stage into the next:

    a0, r0 = stage0.step(m, frames_m)       frames: driver -> object store (one copy)
    a1, r1 = stage1.step(m, a0)             a0: stage 0 -> object store -> stage 1, zero-copy read
    _,  r2 = stage2.step(m, a1, emit=False) the top stage's output is not needed: not stored

Ray starts stage 1's call as soon as a0 is sealed, without a round trip through the driver, which only
reads the small reports r_k (metrics, busy interval). Two things make this the sequential loop:
  - a synchronous actor (max_concurrency 1, no task retries) runs the calls of one caller in submission
    order — a call whose argument is not ready holds back the later ones — so every stage sees
    m, m+1, ... in order, as the loop does;
  - a stage emits the output of the same forward it learned from (workers/learner.py);
so every stage applies the sequential loop's updates, in its order, to the same inputs.

The bounded channel between stage k and k+1 is the driver's admission window: stage k is handed
micro-batch j only once stage k+1 has finished j - D - 1 (D = --queue-depth). At most D outputs of stage k
then wait for stage k+1, and a fast stage is not handed work (it idles) instead of filling the object
store: backpressure, bounded memory. The top stage hands its output to the driver, which takes it at once.

    stage 1 twice as slow as stage 0, D = 2; one column per time unit
    time ->    1   2   3   4   5   6   7   8   9
    stage 0    m0  m1  m2  m3  .   m4  .   m5  .     after m3 it waits: m2 and m3 (D of them) are queued
    stage 1        m0  m0  m1  m1  m2  m2  m3  m3    stage 1 sets the pace, never starved

With D = 1 the fast stage still overlaps the slow one (it works on j+1 while the next works on j); a
larger D absorbs jitter, and the driver's own latency in noticing that a stage finished, at the cost of
D activations per boundary held in the object store.

[Note: recovery]
Barrier checkpoints ride the same channels ([Note: barrier checkpoints] in pipeline/checkpoint.py): the
driver submits `snapshot(m)` to each stage right behind its `step(m)`. A run with a checkpoint store
always has one complete checkpoint: the state it started from is written before the first micro-batch.
Two kinds of failure differ:
  - a `StageError` raised by a stage's own code (a non-finite loss, a bad input) is deterministic: the
    same micro-batch would fail again. The run stops, naming stage and micro-batch.
  - a lost actor (`ray.kill`, its process killed, its node gone — Ray raises RayActorError or an
    error in the argument it never produced) is not the stage's doing. The driver replaces the dead
    actors in their placement-group bundles, has every stage (survivors too: they are ahead) load its
    part of the last complete checkpoint `s`, and replays the source from micro-batch s. A survivor's
    queued calls run before its restore (submission order), so nothing from the rolled-back timeline
    survives the restore, and the ledger saved with the state drops those applications as well. The
    sampler is a pure function of (seed, m), so the replay sees the same data; `on_step` is not
    called again for micro-batches it has already seen (their reports are identical).
A failure that recurs with no progress in between (no newer complete checkpoint and no micro-batch
seen for the first time) `MAX_RECOVERIES` times in a row stops the run with a `RecoveryError`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from typing_extensions import Self  # typing.Self from Python 3.11; typing_extensions comes with torch

from pipeline.checkpoint import Checkpointing, CheckpointStore, Ledger, RunControl, StageFile
from pipeline.config import TrainConfig
from pipeline.data import ClipSampler
from pipeline.stage_actor import StageError, StepReport, remote_stage_class
from pipeline.telemetry import DriverTelemetry
from workers.learner import LearnerSpec, stage_ranges

logger = logging.getLogger(__name__)

__all__ = ["NAMESPACE", "PlacementError", "RecoveryError", "StageError", "StageLost", "StagePipeline", "connect",
           "run_ray"]

OnStep = Callable[[int, list[tuple[int, dict[str, float]]]], None]

NAMESPACE = "lamina"  # Ray namespace of the stage actors: `ray list actors` / ray.get_actor(name, NAMESPACE)
PLACEMENT_TIMEOUT_S = 60.0  # how long to wait for the cluster to fit the stages before giving up
DRAIN_TIMEOUT_S = 60.0  # on Ctrl-C, how long to let in-flight micro-batches finish before killing
MAX_RECOVERIES = 3  # consecutive recoveries without progress before a run gives up ([Note: recovery])
PING_TIMEOUT_S = 60.0  # how long a surviving stage may take to answer after a failure (its queue drains)
POLL_S = 0.5  # the driver loop wakes at least this often to see stop / checkpoint requests


class PlacementError(RuntimeError):
    """The cluster cannot fit one bundle per stage."""


class StageLost(StageError):
    """A stage actor died (killed, crashed, its node lost) rather than failing in its own code: the run
    can recover from the last complete checkpoint ([Note: recovery])."""


class RecoveryError(RuntimeError):
    """Stage failures keep recurring without progress: the run stops instead of looping."""


def run_ray(cfg: TrainConfig, spec: LearnerSpec, sampler: ClipSampler, on_step: OnStep, start: int = 0,
            states: list[dict] | None = None, checkpointing: Checkpointing | None = None) -> list[dict]:
    """Train micro-batches [start, cfg.steps) through one Ray actor per stage; every learner's state.

    Besides each layer's objective metrics, the metrics dicts passed to `on_step` carry the stage's
    `stage` index, its busy interval `busy_start`/`busy_end` (time.time() seconds) for that micro-batch,
    and its recent throughput `mb_per_s` and `busy` fraction.

    With `checkpointing` (a store), it takes barrier checkpoints, recovers from lost stage actors
    ([Note: recovery]) and stops early, after a final checkpoint, when `checkpointing.control` asks.
    """
    n_stages = len(stage_ranges(len(spec.blocks), cfg.layers_per_stage))
    connect(cfg, n_stages * cfg.cpus_per_stage)
    with StagePipeline(cfg, spec, checkpointing=checkpointing) as pipe:
        if states is not None:
            pipe.load(states, checkpointing.ledgers if checkpointing is not None else None)
        pipe.train(sampler, start, cfg.steps, on_step)
        return pipe.states()


def connect(cfg: TrainConfig, cpus: float = 1.0) -> None:
    """Join the Ray this process already has, the cluster at --address / RAY_ADDRESS, or start one here.

    A local Ray gets at least `cpus` logical CPUs so that the stages' bundles fit, even when that is more
    than the machine's cores (the stages then time-share them; logged).
    """
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ctx = ray.init(address=address)
        logger.info("joined the Ray cluster at %s; dashboard %s", address, _url(ctx.dashboard_url))
        return
    cores = os.cpu_count() or 1
    num_cpus = max(cores, math.ceil(cpus))
    if num_cpus > cores:
        logger.warning("the stages reserve %g CPUs on a %d-core machine: they will time-share cores",
                       cpus, cores)
    ctx = ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")
    logger.info("started a local Ray (%d CPUs); dashboard %s", num_cpus, _url(ctx.dashboard_url))


def _url(dashboard: str | None) -> str:
    if not dashboard:
        return "off"
    return dashboard if dashboard.startswith("http") else f"http://{dashboard}"


def run_id(cfg: TrainConfig) -> str:
    """Short id of a run: the run directory's name (or the time) and 4 random hex digits, so that two runs
    on one cluster never collide on actor names."""
    base = os.path.basename(os.path.normpath(cfg.run_dir)) if cfg.run_dir else time.strftime("%Y%m%d-%H%M%S")
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '-', base)}-{secrets.token_hex(2)}"


class StagePipeline:
    """The placed, named stage actors of one run and the loop that drives micro-batches through them.

    Use as a context manager: `__enter__` places the actors, `__exit__` kills them and frees the placement
    group, whatever happened in between.
    """

    def __init__(self, cfg: TrainConfig, spec: LearnerSpec, run: str | None = None,
                 checkpointing: Checkpointing | None = None) -> None:
        self.cfg, self.spec = cfg, spec
        self.checkpointing = checkpointing or Checkpointing(None)
        self.store: CheckpointStore | None = self.checkpointing.store
        self.control: RunControl = self.checkpointing.control
        self.max_recoveries = MAX_RECOVERIES
        self.recoveries = 0  # stage failures recovered from in this run
        self._gpu = False  # whether stages get a GPU each (set by start)
        self._generation = 0  # bumped per recovery: replacement actors get fresh names
        self._emitted = 0  # on_step has seen micro-batches below this (across recoveries)
        self.ranges = stage_ranges(len(spec.blocks), cfg.layers_per_stage)
        self.run = run or run_id(cfg)
        self.names = [f"lamina-{self.run}-stage{k}" for k in range(len(self.ranges))]
        self.actors: list[Any] = []  # ray.actor.ActorHandle of StageWorker, bottom to top
        self.info: list[dict[str, Any]] = []  # StageWorker.info() of each stage: node, device, layers
        self.pg: PlacementGroup | None = None
        self._telemetry: DriverTelemetry | None = None

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- placement ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Reserve one bundle per stage, start the stage actors in them, wait until all are up."""
        cfg, n = self.cfg, len(self.ranges)
        gpu = ray.cluster_resources().get("GPU", 0) >= 1
        bundle = {"CPU": cfg.cpus_per_stage, "GPU": 1} if gpu else {"CPU": cfg.cpus_per_stage}
        strategy = cfg.placement.upper()
        self.pg = placement_group([dict(bundle) for _ in range(n)], strategy=strategy,
                                  name=f"lamina-{self.run}")
        if not self.pg.wait(timeout_seconds=PLACEMENT_TIMEOUT_S):
            raise PlacementError(
                f"could not place {n} stage bundles {bundle} ({strategy}) within {PLACEMENT_TIMEOUT_S:g}s: "
                f"the cluster has {ray.cluster_resources()}, of which {ray.available_resources()} free. "
                f"Lower --cpus-per-stage, raise --layers-per-stage, or add nodes.")
        self._gpu = gpu
        self.actors = [self._spawn(k) for k in range(n)]
        self.info = [self._get(k, None, a.info.remote()) for k, a in enumerate(self.actors)]
        for i in self.info:
            logger.info("%s: layers %s on node %s (%s, %d thread(s))", i["name"], list(i["layers"]),
                        i["node_id"][:8], i["device"], i["threads"])
        self._telemetry = DriverTelemetry(self.run)

    def _spawn(self, k: int) -> Any:
        """Start stage k's actor in its bundle (named `<name>-r<generation>` when it replaces a lost one)."""
        first, last = self.ranges[k]
        assert self.pg is not None
        if self._generation:
            self.names[k] = f"lamina-{self.run}-stage{k}-r{self._generation}"
        return remote_stage_class().options(
            name=self.names[k], namespace=NAMESPACE, num_cpus=self.cfg.cpus_per_stage,
            num_gpus=1 if self._gpu else 0,
            # Ordered execution is what transparency rests on ([Note: channels]): no retries, one call at a
            # time. No restarts either: a restarted actor would come back with its initial state; the
            # driver replaces it and restores a checkpoint instead ([Note: recovery]).
            max_restarts=0, max_task_retries=0, max_concurrency=1,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=k),
        ).remote(self.spec, first, last, k, self.run, max(1, int(self.cfg.cpus_per_stage)), self.names[k])

    def close(self) -> None:
        """Kill every stage actor and free the placement group; safe to call twice."""
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except RayError as e:  # already dead: nothing to free
                logger.debug("kill: %s", e)
        self.actors = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None

    # -- state ----------------------------------------------------------------------------------------

    def load(self, states: list[dict], ledgers: list[Ledger] | None = None) -> None:
        """Give each stage its learners' states (bottom to top, as `states()` returns them) and, on a
        resume, the ledger of what they applied (one per learner, as a checkpoint holds them)."""
        if len(states) != len(self.spec.blocks):
            raise ValueError(f"expected one learner state per layer ({len(self.spec.blocks)}), "
                             f"got {len(states)}")
        refs = [a.load_state_dict.remote({"learners": states[first:last]},
                                         ledgers[first].ranges if ledgers else None)
                for a, (first, last) in zip(self.actors, self.ranges, strict=True)]
        for k, ref in enumerate(refs):
            self._get(k, None, ref)

    def states(self) -> list[dict]:
        """Every learner's state, bottom to top. Queued behind the stages' steps, so it is the final state."""
        return [s for state in self._ask_all("state_dict") for s in state["learners"]]

    def _ask_all(self, method: str) -> list[Any]:
        """One call on every stage. A stage lost after training ended is restored from the last complete
        checkpoint — the end-of-run one — and asked again."""
        for attempt in range(2):
            refs = [getattr(a, method).remote() for a in self.actors]
            try:
                return [self._get(k, None, ref) for k, ref in enumerate(refs)]
            except StageLost as e:
                latest = self.store.latest_complete() if self.store is not None else None
                if attempt or latest is None:
                    raise
                logger.warning("%s; restoring checkpoint %d", e, latest)
                self._recover(latest)
        raise AssertionError("unreachable")

    def ledgers(self) -> list[Ledger]:
        """Each stage's ledger: the micro-batches its current state has applied."""
        return [Ledger(ranges) for ranges in self._ask_all("get_ledger")]

    def request_checkpoint(self) -> None:
        """Take a barrier checkpoint as soon as possible (after the next micro-batch handed out)."""
        self.control.request_checkpoint()

    def request_stop(self) -> None:
        """Stop handing out micro-batches; `train` drains, writes a final checkpoint and returns."""
        self.control.request_stop()

    # -- the driver loop ------------------------------------------------------------------------------

    def train(self, sampler: ClipSampler, start: int, stop: int, on_step: OnStep) -> None:
        """Drive micro-batches [start, stop) through the stages ([Note: channels]); returns when the last
        stage has finished `stop - 1` (or, after a stop request, the last micro-batch handed out) and
        `on_step` has seen every micro-batch. With a store, lost stages are recovered ([Note: recovery])."""
        self._emitted = start
        store = self.store
        if store is not None and store.record(start) is None:
            self._barrier_now(start - 1)  # the state this run starts from: what an early failure restores
        segment = start
        progress_mark = (-1, -1)  # (newest complete checkpoint, micro-batches seen) at the last failure
        stalled = 0
        while True:
            try:
                self._segment(sampler, segment, stop, on_step)
                return
            except StageLost as e:
                if store is None:
                    raise
                latest = store.latest_complete()
                assert latest is not None  # written before the first micro-batch
                mark = (latest, self._emitted)
                stalled = stalled + 1 if mark <= progress_mark else 1
                progress_mark = max(mark, progress_mark)
                if stalled > self.max_recoveries:
                    raise RecoveryError(
                        f"{e} — {stalled} failures in a row without progress (restoring checkpoint "
                        f"{latest}, {self._emitted} micro-batches seen each time): not retrying") from e
                logger.warning("%s; recovering (%d) from checkpoint %s", e, self.recoveries + 1,
                               store.dir(latest))
                segment = self._recover(latest)

    def _recover(self, step: int) -> int:
        """Replace the dead stage actors, restore every stage from checkpoint `step`; returns `step`.
        A stage that dies during the restore is replaced too (bounded by the same attempts)."""
        assert self.store is not None
        self.recoveries += 1
        for attempt in range(self.max_recoveries + 1):
            dead = [k for k in range(len(self.actors)) if not self._alive(k)]
            if dead:
                self._generation += 1
                for k in dead:
                    try:
                        ray.kill(self.actors[k], no_restart=True)
                    except RayError as e:
                        logger.debug("kill: %s", e)
                    self.actors[k] = self._spawn(k)
                    logger.warning("stage %d replaced by %s", k, self.names[k])
            refs = [a.restore.remote(self.store, step) for a in self.actors]
            try:
                for k, ref in enumerate(refs):
                    self._get(k, None, ref)
                return step
            except StageLost as e:
                logger.warning("restore attempt %d failed: %s", attempt + 1, e)
        raise RecoveryError(f"could not restore checkpoint {step} after {self.max_recoveries + 1} attempts")

    def _alive(self, k: int) -> bool:
        try:
            ray.get(self.actors[k].info.remote(), timeout=PING_TIMEOUT_S)
            return True
        except (RayError, GetTimeoutError):
            return False

    def _barrier_now(self, m: int) -> None:
        """A checkpoint of the stages as they are now, after micro-batch m (nothing in flight)."""
        assert self.store is not None
        refs = [a.snapshot.remote(m, self.store) for a in self.actors]
        self.store.commit(m + 1, [self._get(k, m, ref) for k, ref in enumerate(refs)])

    def _segment(self, sampler: ClipSampler, start: int, stop: int, on_step: OnStep) -> None:
        """Micro-batches [start, stop) with barriers, from stages holding the state after start - 1."""
        n, depth, store, control = len(self.actors), self.cfg.queue_depth, self.store, self.control
        handed = [start] * n  # next micro-batch to hand to stage k
        done = [start] * n  # micro-batches stage k has finished (reports received, in order)
        outputs: list[deque[Any]] = [deque() for _ in range(n)]  # stage k's output refs not yet handed on
        pending: list[deque[tuple[int, Any]]] = [deque() for _ in range(n)]  # (m, report ref) per stage
        reports: dict[int, list[StepReport | None]] = {}
        cursor = start  # reports of micro-batches [start, cursor) are complete and handled
        limit = stop  # lowered to what stage 0 was handed when a stop is requested
        barriers: dict[int, list[Any]] = {}  # m -> snapshot(m) refs of the stages handed m so far

        def may_hand(k: int) -> bool:
            j = handed[k]
            if j >= limit or (k > 0 and j >= handed[k - 1]):  # done, or its input not yet submitted
                return False
            consumer = done[k + 1] if k + 1 < n else done[k]  # the driver consumes the top stage at once
            return j - consumer <= depth

        def hand(k: int) -> None:
            j = handed[k]
            x = sampler.batch(j).frames.numpy() if k == 0 else outputs[k - 1].popleft()
            out, report = self.actors[k].step.remote(j, x, k + 1 < n)
            if k + 1 < n:
                outputs[k].append(out)
            pending[k].append((j, report))
            handed[k] += 1
            if store is not None:
                if k == 0 and (self.checkpointing.due(j) or j == stop - 1):
                    barriers[j] = []
                if j in barriers:  # [Note: barrier checkpoints]: right behind step(j), on the same actor
                    barriers[j].append(self.actors[k].snapshot.remote(j, store))

        def commit_barriers() -> list[Any]:
            """Commit the oldest barriers every stage has written; the refs still to wait for."""
            assert store is not None
            while barriers:
                m = min(barriers)
                refs = barriers[m]
                if len(refs) < n:
                    # Not every stage has been handed m yet: nothing to wait for. (Waiting on the refs
                    # already there would return at once, again and again: a busy loop that steals the
                    # stages' cores until the other stages catch up.)
                    return []
                _, left = ray.wait(refs, num_returns=len(refs), timeout=0)
                if left:
                    return left
                files: list[StageFile] = [self._get(k, m, ref) for k, ref in enumerate(refs)]
                store.commit(m + 1, files)
                del barriers[m]
            return []

        try:
            while cursor < limit or barriers:
                if control.stop_requested and limit == stop and handed[0] < stop:
                    limit = handed[0]  # stage 0 gets nothing more; the others finish what it was handed
                    control.stopped_at = limit
                    logger.warning("stop requested: draining micro-batches up to %d, then a checkpoint", limit)
                    if store is not None and limit > start and limit - 1 not in barriers:
                        barriers[limit - 1] = [self.actors[k].snapshot.remote(limit - 1, store)
                                               for k in range(n) if handed[k] == limit]
                for k in range(n):  # bottom up: stage k's j is submitted before stage k+1's j
                    while may_hand(k):
                        hand(k)
                heads = {pending[k][0][1]: k for k in range(n) if pending[k]}
                waiting = commit_barriers() if store is not None else []
                if not heads and not waiting:
                    continue  # the last barrier was just committed: the loop ends
                ready, _ = ray.wait([*heads, *waiting], num_returns=1, timeout=POLL_S)
                for ref in ready:
                    if ref not in heads:
                        continue  # a snapshot: committed by commit_barriers
                    k = heads[ref]
                    m, _ = pending[k].popleft()
                    report = self._get(k, m, ref)
                    assert (report.stage, report.micro_batch) == (k, m), (report, k, m)
                    done[k] += 1
                    reports.setdefault(m, [None] * n)[k] = report
                while cursor in reports and all(r is not None for r in reports[cursor]):
                    rows = _rows(reports.pop(cursor))
                    if cursor >= self._emitted:  # not a replay after a recovery: on_step sees it once
                        on_step(cursor, rows)
                        self._emitted = cursor + 1
                    cursor += 1
                if self._telemetry is not None:
                    self._telemetry.queue_depths(h - d for h, d in zip(handed, done, strict=True))
        except KeyboardInterrupt:
            if control.stop_requested:  # the second Ctrl-C: out at once; the last complete checkpoint stands
                logger.warning("interrupted again: exiting without draining")
            else:
                self._drain([ref for q in pending for _, ref in q])
            raise

    def _drain(self, refs: list[Any]) -> None:
        """Let what is in flight finish (bounded by DRAIN_TIMEOUT_S), so stages stop between micro-batches."""
        logger.warning("interrupted: draining %d in-flight stage steps (up to %gs)", len(refs),
                       DRAIN_TIMEOUT_S)
        try:
            _, left = ray.wait(refs, num_returns=len(refs), timeout=DRAIN_TIMEOUT_S)
        except KeyboardInterrupt:
            logger.warning("interrupted again: not draining")
            return
        if left:
            logger.warning("%d stage steps still running after %gs: killing them", len(left), DRAIN_TIMEOUT_S)

    def _get(self, k: int, m: int | None, ref: Any) -> Any:
        """ray.get of stage k's result for micro-batch m (None: not a step); failures as one StageError."""
        try:
            return ray.get(ref)
        except RayError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, StageError):  # raised by a stage; possibly k's input, failed below it
                raise StageError(cause.stage, cause.micro_batch, cause.cause, cause.actor) from e
            # Not the stage's own code: the actor (or the one that produced its input) is gone.
            raise StageLost(k, m, e, self.names[k]) from e


def _rows(reports: list[StepReport | None]) -> list[tuple[int, dict[str, float]]]:
    rows = []
    for r in reports:
        assert r is not None
        extra = {"stage": float(r.stage), "busy_start": r.start, "busy_end": r.end, "mb_per_s": r.rate,
                 "busy": r.busy}
        rows += [(layer, {**metrics, **extra}) for layer, metrics in r.layers]
    return rows
