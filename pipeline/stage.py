"""One pipeline stage: a run of consecutive learners on one device, as a plain Python class.

The Ray engine hosts one `Stage` per actor (made remote in one place: pipeline/engines/actors.py); the
in-process engines step one `Stage` holding the whole network. Nothing here calls Ray: the device, the
actor's name and where its reports go are passed in, so a unit test can step it (the actor sets its own
thread budget).

A stage adds to its learners only what running in a pipeline needs:
  - arrays in, arrays out: a numpy input is wrapped without a copy, and the output leaves as numpy (which
    Ray's object store hands to the next stage without a copy; torch tensors would be pickled by value);
  - a `StepReport` per micro-batch: each layer's metrics and the busy interval, small, no tensors;
  - a non-finite loss stops the run here, where the stage and micro-batch are known;
  - errors become a `StageError` naming the stage and the micro-batch;
  - a ledger of the micro-batches it applied, and its part of every barrier checkpoint, written by the
    stage itself ([Note: the checkpoint store] in pipeline/checkpoints/store.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.allocator import keep_freed_memory
from pipeline.checkpoints import CheckpointStore, Ledger, Part
from pipeline.errors import CheckpointError, StageError
from pipeline.slack import GiveWay
from workers.learner import Learner, LearnerSpec, LearnerStack
from workers.replicas import ReplicaGroup, ReplicaLost


@dataclass(frozen=True)
class LayerReport:
    """One layer's metrics for one micro-batch, on the common scale of workers/objectives.py."""

    layer: int  # 0-based layer index, bottom to top
    loss: float  # the local loss the layer minimised
    pos: float  # mean squared distance between consecutive frames of a clip (unit embeddings, 0..4)
    neg: float  # mean squared distance between frames of different clips (unit embeddings, 0..4)
    over: float  # fraction of consecutive-frame pairs farther apart than the layer's delta
    spread: float  # feature spread: ~1 healthy, -> 0 on collapse


@dataclass(frozen=True)
class StepReport:
    """What a stage tells the driver after each micro-batch (the activation travels separately)."""

    stage: int  # stage index, 0 = bottom
    micro_batch: int  # micro-batch number m
    layers: tuple[LayerReport, ...]  # bottom to top
    start: float  # busy interval of this step, time.time() seconds: input in hand ...
    end: float  # ... to output ready
    rate: float  # micro-batches per second over the stage's recent steps
    busy: float  # busy fraction over the same window
    giving_way: bool = False  # this step ran at SCHED_IDLE: the stage has slack (pipeline/slack.py)


@dataclass(frozen=True)
class Hop:
    """What travels from stage to stage on the compiled-graph and shm transports ([Note: in-band barriers] in
    pipeline/engines/inband.py): the activation with the control that goes with it, so that a stage's barrier
    snapshot keeps its place right behind its step in the one order every stage runs its messages in."""

    m: int  # micro-batch number
    step: bool  # learn from x (False: a snapshot-only message, x is None)
    store: CheckpointStore | None  # write this stage's part of the barrier after m here (None: no barrier)
    x: np.ndarray | None  # the input of this stage: frames for stage 0, the stage below's output above it
    #   (None in an shm channel's message: the array travels beside it, in a shared-memory slot)


@dataclass(frozen=True)
class HopResult:
    """What a stage hands the driver for one `Hop`: small, no tensors."""

    m: int  # the Hop's micro-batch number
    step: bool  # the Hop's: a step's result (False: a snapshot-only message's)
    report: StepReport | None  # the step's report (None: a snapshot-only message)
    part: Part | CheckpointError | None  # its part of the barrier, or why the store refused it (None: no barrier)


@dataclass(frozen=True)
class HopFailed:
    """On the shm transport, in place of a `Hop` (up the chain) and of a `HopResult` (to the driver): the
    message for m failed in a stage, this one or one below (pipeline/engines/shm.py)."""

    m: int  # micro-batch number
    step: bool  # the failed message's
    error: BaseException  # the stage's StageError, a lost replica (ReplicaLost), or another of lamina's errors


def partition(n_layers: int, per_stage: int) -> list[tuple[int, int]]:
    """Consecutive layer ranges [first, last) of at most `per_stage` layers, bottom to top."""
    if per_stage < 1:
        raise ValueError(f"layers per stage must be >= 1 (got {per_stage})")
    return [(k, min(k + per_stage, n_layers)) for k in range(0, n_layers, per_stage)]


class BusyWindow:
    """Throughput and busy fraction of a stage over its last `size` steps, from (start, end) intervals."""

    SIZE = 20  # steps in the window

    def __init__(self) -> None:
        self._intervals: deque[tuple[float, float]] = deque(maxlen=self.SIZE)

    def add(self, start: float, end: float) -> tuple[float, float]:
        """Record one step; returns (micro-batches per second, busy fraction) over the window."""
        self._intervals.append((start, end))
        span = end - self._intervals[0][0]
        if span <= 0:
            return 0.0, 1.0
        busy = sum(e - s for s, e in self._intervals)
        return len(self._intervals) / span, min(1.0, busy / span)


class Stage:
    """Layers [first, last) of the network, each learning locally, or (e2e) one learner holding them all.

    `first`/`last` in checkpoints count learners: a layer-local stage holds learner k for layer k; the
    end-to-end learner is learner 0 of [0, 1).
    """

    def __init__(self, spec: LearnerSpec, first: int, last: int, index: int = 0, *, e2e: bool = False,
                 name: str = "", device: str | torch.device = "cpu",
                 report: Callable[[StepReport], None] | None = None) -> None:
        self.index, self.name = index, name  # the actor's name, when it is one
        self.device = torch.device(device)
        keep_freed_memory()  # its steps reuse their activations' memory (pipeline/allocator.py)
        if e2e:
            self.stack = LearnerStack([Learner(spec, first, last, self.device)])
            self.first, self.last = 0, 1
        else:
            self.stack = LearnerStack.layer_local(spec, first, last, self.device)
            self.first, self.last = first, last
        self.layers = tuple(lrn.last - 1 for lrn in self.stack.learners)  # each learner reports its top block
        self.ledger = Ledger()  # micro-batches applied, restored with the state: exactly-once evidence
        self.window = BusyWindow()
        self._report = report  # where each StepReport also goes (the actor's gauges), besides the caller
        self.group: ReplicaGroup | None = None  # this stage's replica group, when it runs as R > 1 replicas
        self.give_way: GiveWay | None = None  # set by a host whose stages give way while they have slack

    def set_group(self, group: ReplicaGroup | None) -> None:
        """Run as one replica of a group (workers/replicas.py): `step` is then given this replica's share of
        the clips, and every replica's learners compute the whole micro-batch's loss and gradient."""
        self.group = group
        for learner in self.stack.learners:
            learner.group = group

    def step(self, m: int, x: np.ndarray | torch.Tensor, emit: bool = True, as_tensor: bool = False,
             into: Callable[[tuple[int, ...], np.dtype], np.ndarray] | None = None) -> tuple[Any, StepReport]:
        """Learn from micro-batch m; return this stage's output (None when `emit` is off) and a report. The
        output is a numpy array on the cpu, or with `as_tensor` a torch tensor on the stage's device (for a
        transport that carries tensors itself); `into` (shape, dtype) gives the host memory to write it in
        ([Note: emitting into a slot] in workers/learner.py). A replica is given its share of the clips
        (workers/replicas.py `share`) and returns the whole micro-batch's output."""
        start, cpu = time.time(), time.thread_time()
        with self.give_way or contextlib.nullcontext():  # a stage with slack steps at SCHED_IDLE (pipeline/slack.py)
            y, metrics = self._compute(m, x, emit, as_tensor, into)
        self.ledger.add(m)
        end = time.time()
        rate, busy = self.window.add(start, end)
        if self.give_way is not None:
            self.give_way.record(start, end, time.thread_time() - cpu)
        layers = tuple(LayerReport(layer, **mt) for layer, mt in zip(self.layers, metrics, strict=True))
        report = StepReport(self.index, m, layers, start, end, rate, busy,
                            self.give_way is not None and self.give_way.stepped_idle)
        if self._report is not None:
            self._report(report)
        return y, report

    def _compute(self, m: int, x: np.ndarray | torch.Tensor, emit: bool, as_tensor: bool,
                 into: Callable[[tuple[int, ...], np.dtype], np.ndarray] | None) -> tuple[Any, list[dict[str, float]]]:
        """`step`'s work: the output (see there) and each learner's metrics."""
        try:
            xt = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
            # replicas gather their output anew: theirs is not made where it goes
            slot = _tensors(into) if into is not None and emit and self.group is None else None
            out, metrics = self.stack.step(xt.to(self.device), slot)
            # [Note: the non-finite guard] One guard for every engine: a non-finite loss, or a step that made
            # a weight non-finite (an lr too large can do that with a finite loss), has been stepped into the
            # weights, so the run cannot go on; it stops here, where layer and micro-batch are known, and
            # no barrier behind this step is ever written: the last complete checkpoint is the last good
            # state. Cost: the loss check is free (metrics are Python floats); the weight check is one
            # reduction over the layer's parameters and, on a GPU, one sync per step.
            for learner, layer, mt in zip(self.stack.learners, self.layers, metrics, strict=True):
                if not math.isfinite(mt["loss"]):
                    raise FloatingPointError(f"layer {layer + 1}: local loss is {mt['loss']} (input finite: "
                                             f"{bool(torch.isfinite(xt).all())})")
                if not _finite(learner.modules().parameters()):
                    raise FloatingPointError(f"layer {layer + 1}: a weight became non-finite in this step "
                                             f"(loss {mt['loss']:.4g}; a smaller --lr?)")
            if self.group is not None and emit:
                out = self.group.gather_output(out)
            # .cpu() is a device sync on cuda; on the cpu .numpy() shares the tensor's memory, and the
            # only copy is Ray's into the object store.
            y = None if not emit else out.contiguous() if as_tensor else out.cpu().numpy()
        except ReplicaLost:
            raise  # a replica of this stage is gone: not the stage's doing, the driver recovers it
        except Exception as e:
            raise StageError(self.index, m, e, self.name) from e
        return y, metrics

    def hop(self, msg: Hop, emit: bool = True,
            into: Callable[[tuple[int, ...], np.dtype], np.ndarray] | None = None,
            as_tensor: bool = False) -> tuple[Hop, HopResult]:
        """Step on `msg` (when it carries a step), then write the barrier snapshot it asks for; returns the
        message for the stage above (its output as `step` makes it) and the result for the driver. A store
        that refuses the snapshot is reported in the result, not raised: the run decides ([Note: barrier
        checkpoints])."""
        y, report = None, None
        if msg.step:
            assert msg.x is not None, msg  # the driver and the stage below always send an input with a step
            y, report = self.step(msg.m, msg.x, emit, as_tensor, into)
        part: Part | CheckpointError | None = None
        if msg.store is not None:
            try:
                part = self.snapshot(msg.m, msg.store)
            except CheckpointError as e:
                part = e
        return Hop(msg.m, msg.step, msg.store, y), HopResult(msg.m, msg.step, report, part)

    # -- state -----------------------------------------------------------------------------------------

    def states(self) -> list[dict]:
        """Every learner's state, tensors on the cpu."""
        return [_to_cpu(lrn.state_dict()) for lrn in self.stack.learners]

    def load(self, states: list[dict], ledger: list[list[int]] | None = None) -> None:
        """Take these learners' states (as `states()` returns them) and the ledger that goes with them."""
        try:
            for learner, state in zip(self.stack.learners, states, strict=True):
                learner.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"stage {self.index}: the saved learner states do not fit this network ({e})") from e
        self.ledger = Ledger(ledger)

    def get_ledger(self) -> list[list[int]]:
        return self.ledger.ranges

    def snapshot(self, m: int, store: CheckpointStore) -> Part:
        """Write this stage's state as it is after micro-batch m to checkpoint m + 1 of `store` (queued
        right behind step(m): [Note: barrier checkpoints] in pipeline/schedule.py)."""
        try:
            return store.write_part(m + 1, self.index, {
                "stage": self.index, "first": self.first, "last": self.last, "step": m + 1,
                "learners": self.states(), "ledger": [list(r) for r in self.ledger.ranges]})
        except OSError as e:  # the store's failure, not the stage's: the run decides (BarrierHealth)
            raise CheckpointError(f"stage {self.index} could not write its part of checkpoint {m + 1} to "
                                  f"{store.uri}: {e}") from e

    def restore(self, store: CheckpointStore, step: int) -> int:
        """Load this stage's part of complete checkpoint `step` (read here, not through the driver)."""
        part = store.read_part(step, self.index)
        if (part["first"], part["last"]) != (self.first, self.last):
            raise CheckpointError(f"checkpoint {step} stage {self.index} holds learners [{part['first']}, "
                                  f"{part['last']}), this stage [{self.first}, {self.last})")
        self.load(part["learners"], part["ledger"])
        return step

    def info(self) -> dict[str, Any]:
        """Where this stage runs: for logs and for tests of placement."""
        return {"stage": self.index, "name": self.name, "layers": self.layers, "device": str(self.device),
                "threads": torch.get_num_threads(), "pid": os.getpid()}


def _finite(params: Iterator[torch.Tensor]) -> bool:
    return bool(torch.stack([p.detach().isfinite().all() for p in params]).all())


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _tensors(into: Callable[[tuple[int, ...], np.dtype], np.ndarray],
             ) -> Callable[[tuple[int, ...], torch.dtype], torch.Tensor]:
    """`into` as the learner asks for memory: (shape, torch dtype) -> a tensor over the array it gives."""
    def tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(into(shape, torch.empty(0, dtype=dtype).numpy().dtype))
    return tensor
