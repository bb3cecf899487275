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
from ray.exceptions import RayError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from typing_extensions import Self  # typing.Self from Python 3.11; typing_extensions comes with torch

from pipeline.config import TrainConfig
from pipeline.data import ClipSampler
from pipeline.stage_actor import StageError, StepReport, remote_stage_class
from pipeline.telemetry import DriverTelemetry
from workers.learner import LearnerSpec, stage_ranges

logger = logging.getLogger(__name__)

__all__ = ["NAMESPACE", "PlacementError", "StageError", "StagePipeline", "connect", "run_ray"]

OnStep = Callable[[int, list[tuple[int, dict[str, float]]]], None]

NAMESPACE = "lamina"  # Ray namespace of the stage actors: `ray list actors` / ray.get_actor(name, NAMESPACE)
PLACEMENT_TIMEOUT_S = 60.0  # how long to wait for the cluster to fit the stages before giving up
DRAIN_TIMEOUT_S = 60.0  # on Ctrl-C, how long to let in-flight micro-batches finish before killing


class PlacementError(RuntimeError):
    """The cluster cannot fit one bundle per stage."""


def run_ray(cfg: TrainConfig, spec: LearnerSpec, sampler: ClipSampler, on_step: OnStep, start: int = 0,
            states: list[dict] | None = None) -> list[dict]:
    """Train micro-batches [start, cfg.steps) through one Ray actor per stage; every learner's state.

    Besides each layer's objective metrics, the metrics dicts passed to `on_step` carry the stage's
    `stage` index, its busy interval `busy_start`/`busy_end` (time.time() seconds) for that micro-batch,
    and its recent throughput `mb_per_s` and `busy` fraction.
    """
    n_stages = len(stage_ranges(len(spec.blocks), cfg.layers_per_stage))
    connect(cfg, n_stages * cfg.cpus_per_stage)
    with StagePipeline(cfg, spec) as pipe:
        if states is not None:
            pipe.load(states)
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

    def __init__(self, cfg: TrainConfig, spec: LearnerSpec, run: str | None = None) -> None:
        self.cfg, self.spec = cfg, spec
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
        stage_cls = remote_stage_class()
        threads = max(1, int(cfg.cpus_per_stage))
        for k, (first, last) in enumerate(self.ranges):
            self.actors.append(stage_cls.options(
                name=self.names[k], namespace=NAMESPACE, num_cpus=cfg.cpus_per_stage,
                num_gpus=1 if gpu else 0,
                # Ordered execution is what transparency rests on ([Note: channels]): no retries, one
                # call at a time.
                max_restarts=0, max_task_retries=0, max_concurrency=1,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=k),
            ).remote(self.spec, first, last, k, self.run, threads, self.names[k]))
        self.info = [self._get(k, None, a.info.remote()) for k, a in enumerate(self.actors)]
        for i in self.info:
            logger.info("%s: layers %s on node %s (%s, %d thread(s))", i["name"], list(i["layers"]),
                        i["node_id"][:8], i["device"], i["threads"])
        self._telemetry = DriverTelemetry(self.run)

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

    def load(self, states: list[dict]) -> None:
        """Give each stage its learners' states (bottom to top, as `states()` returns them)."""
        if len(states) != len(self.spec.blocks):
            raise ValueError(f"expected one learner state per layer ({len(self.spec.blocks)}), "
                             f"got {len(states)}")
        refs = [a.load_state_dict.remote({"learners": states[first:last]})
                for a, (first, last) in zip(self.actors, self.ranges, strict=True)]
        for k, ref in enumerate(refs):
            self._get(k, None, ref)

    def states(self) -> list[dict]:
        """Every learner's state, bottom to top. Queued behind the stages' steps, so it is the final state."""
        refs = [a.state_dict.remote() for a in self.actors]
        return [s for k, ref in enumerate(refs) for s in self._get(k, None, ref)["learners"]]

    # -- the driver loop ------------------------------------------------------------------------------

    def train(self, sampler: ClipSampler, start: int, stop: int, on_step: OnStep) -> None:
        """Drive micro-batches [start, stop) through the stages ([Note: channels]); returns when the last
        stage has finished `stop - 1` and `on_step` has seen every micro-batch."""
        n, depth = len(self.actors), self.cfg.queue_depth
        handed = [start] * n  # next micro-batch to hand to stage k
        done = [start] * n  # micro-batches stage k has finished (reports received, in order)
        outputs: list[deque[Any]] = [deque() for _ in range(n)]  # stage k's output refs not yet handed on
        pending: list[deque[tuple[int, Any]]] = [deque() for _ in range(n)]  # (m, report ref) per stage
        reports: dict[int, list[StepReport | None]] = {}
        emitted = start  # on_step has seen micro-batches [start, emitted)

        def may_hand(k: int) -> bool:
            j = handed[k]
            if j >= stop or (k > 0 and j >= handed[k - 1]):  # done, or its input not yet submitted
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

        try:
            while emitted < stop:
                for k in range(n):  # bottom up: stage k's j is submitted before stage k+1's j
                    while may_hand(k):
                        hand(k)
                heads = {pending[k][0][1]: k for k in range(n) if pending[k]}
                ready, _ = ray.wait(list(heads), num_returns=1)
                for ref in ready:
                    k = heads[ref]
                    m, _ = pending[k].popleft()
                    report = self._get(k, m, ref)
                    assert (report.stage, report.micro_batch) == (k, m), (report, k, m)
                    done[k] += 1
                    reports.setdefault(m, [None] * n)[k] = report
                while emitted in reports and all(r is not None for r in reports[emitted]):
                    on_step(emitted, _rows(reports.pop(emitted)))
                    emitted += 1
                if self._telemetry is not None:
                    self._telemetry.queue_depths(h - d for h, d in zip(handed, done, strict=True))
        except KeyboardInterrupt:
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
            raise StageError(k, m, e, self.names[k]) from e


def _rows(reports: list[StepReport | None]) -> list[tuple[int, dict[str, float]]]:
    rows = []
    for r in reports:
        assert r is not None
        extra = {"stage": float(r.stage), "busy_start": r.start, "busy_end": r.end, "mb_per_s": r.rate,
                 "busy": r.busy}
        rows += [(layer, {**metrics, **extra}) for layer, metrics in r.layers]
    return rows
