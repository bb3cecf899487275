"""Transports: how an activation gets from stage k to stage k + 1, behind one seam the driver loop drives.

The driver (pipeline/engines/ray_engine.py) executes the schedule's actions (pipeline/schedule.py) through a
`Transport`: `step(k, m, frames)` hands micro-batch m to stage k, `snapshot(k, m)` puts stage k's barrier
snapshot right behind its step of m, `report(k, m)` waits for stage k's report of m, `parts(m)` gathers a
barrier's parts. Each transport keeps the one order transparency rests on: every stage sees m, m+1, ... and
writes a barrier snapshot right behind the step it belongs to.

    object-store     one Ray actor call per stage step; the output's object reference is chained into the
                     next stage's call, so the activation goes stage -> object store -> stage (numpy:
                     one copy in, zero-copy read) and never through the driver. ~1 ms of Ray per call.
    direct           Ray Direct Transport: a stage's output stays a torch tensor, in the stage's memory (on
                     its GPU), and Ray sends it straight to the stage above over a collective group of the
                     stage actors (gloo on the cpu, NCCL between GPUs); only its small description and the
                     report go through the object store, the report in a second call behind the step.
    compiled-graph   a Ray Compiled Graph over the stage actors, compiled once: the driver writes micro-batch
                     m into the graph's input channel, each stage reads the one below's output from a
                     shared-memory channel and writes its own for the stage above (stages that each own a
                     GPU: a torch tensor over NCCL instead, device to device). No per-call RPC, no object
                     store.
                     In pipeline/engines/compiled_graph.py, with how barriers and recovery work in a graph.
    shm              lamina's own shared-memory channels between the stages of one node: each stage runs a
                     loop that reads its input as a view of a shared-memory slot, steps, and makes its output
                     in the next stage's slot (no copy per hop; FIFOs carry the messages and wake the
                     reader, nothing polls). No Ray call per step. In pipeline/engines/shm.py.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pipeline.checkpoints import CheckpointStore, Part
from pipeline.engines.actors import get
from pipeline.engines.compiled_graph import CompiledGraphTransport
from pipeline.engines.shm import ShmTransport
from pipeline.errors import CheckpointError, ConfigError, StageLost
from pipeline.stage import StepReport

if TYPE_CHECKING:
    from pipeline.engines.placement import StageActors

logger = logging.getLogger(__name__)

TRANSPORTS = ("object-store", "direct", "compiled-graph", "shm")
# `--transport auto`, per device kind, from `lamina bench` on this project's 2-core machine (PERFLOG, 2026-11-30
# S1-S5 and M1-M14): shm ran S = 2 ahead of the object store in thirteen of fourteen side-by-side runs since its
# loop's thread stopped faulting its memory in every step (1.02x-1.09x, the fourteenth 0.996x: M12-M14; before
# that in nine of twelve, the three behind ones in runs whose shm first stage stepped up to 1.4x slower than
# alone: M12's arena), kept the bottleneck stage busy 0.99-1.02 of the time, hands an output over with no
# copy (the stage makes it in the next stage's slot: 1.2-2.3x a memcpy at 1 MB, the object store's over 70x),
# takes no CPU while idle (an idle compiled graph polls with about a core per stage) and a fifth of the
# object store's driver CPU per stage. Direct Transport tied with it once (12.25 against 12.20), led once
# (12.41 against 9.34, a run in which shm's first stage stepped a third slower than alone: M5) and trailed it
# in the others. It needs one node: across nodes `auto` takes the object store.
# cuda: not measured (no GPU lent); `direct` over NCCL is the candidate (device to device): the object store
# until `python -m pipeline.bench.gpu_check` says otherwise.
AUTO = {"cpu": "shm", "cuda": "object-store"}


def resolve(name: str, device: str, nodes: int = 1) -> str:
    """The transport `--transport name` means on stages of `device` ("cpu" or "cuda") placed, with the
    driver, on `nodes` nodes. shm needs one node: `auto` falls back to the object store across nodes, and
    an explicit `shm` is refused."""
    if name == "auto":
        pick = AUTO["cuda" if device.startswith("cuda") else "cpu"]
        return "object-store" if pick == "shm" and nodes > 1 else pick
    if name not in TRANSPORTS:
        raise ConfigError(f"--transport must be auto or one of {list(TRANSPORTS)} (got {name!r})")
    if name == "shm" and nodes > 1:
        raise ConfigError(f"--transport shm needs the driver and every stage on one node; this placement spans "
                          f"{nodes}: use --transport object-store (or direct) across nodes, or --placement pack")
    return name


class Transport(Protocol):
    """One run's stage-to-stage transport over placed stage actors. `begin` before each segment of the
    schedule; `abandon` forgets what is in flight (a failure); `reset` drops what the actors' replacement
    invalidates; `close` before the actors are killed."""

    name: str

    def begin(self, store: CheckpointStore | None) -> None: ...
    def step(self, k: int, m: int, frames: np.ndarray | None) -> None: ...
    def snapshot(self, k: int, m: int) -> None: ...
    def report(self, k: int, m: int, waiting: Any) -> StepReport: ...
    def parts(self, m: int, waiting: Any) -> list[Part | CheckpointError]: ...
    def in_flight_parts(self) -> list[Any]: ...
    def abandon(self) -> None: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...


def make_transport(name: str, actors: StageActors) -> Transport:
    if name == "object-store":
        return ObjectStoreTransport(actors)
    if name == "direct":
        return DirectTransport(actors)
    if name == "compiled-graph":
        return CompiledGraphTransport(actors)
    if name == "shm":
        return ShmTransport(actors)
    raise ConfigError(f"--transport must be one of {list(TRANSPORTS)} (got {name!r})")


class ObjectStoreTransport:
    """Plain actor calls, output references chained stage to stage (the module docstring's `object-store`)."""

    name = "object-store"

    def __init__(self, actors: StageActors) -> None:
        self.actors = actors
        self.store: CheckpointStore | None = None
        self._outputs: dict[tuple[int, int], Any] = {}  # (k, m) -> stage k's output ref of m, until k+1 takes it
        self._pending: dict[tuple[int, int], Any] = {}  # (k, m) -> report ref of stage k's step m
        self._parts: dict[int, dict[int, Any]] = {}  # m -> {k: ref of stage k's snapshot of m}

    def begin(self, store: CheckpointStore | None) -> None:
        self.store = store
        self.abandon()

    def step(self, k: int, m: int, frames: np.ndarray | None) -> None:
        n = len(self.actors)
        x = frames if k == 0 else self._outputs.pop((k - 1, m))
        out, self._pending[(k, m)] = self.actors.handles[k].step.options(num_returns=2).remote(m, x, k + 1 < n)
        if k + 1 < n:
            self._outputs[(k, m)] = out

    def snapshot(self, k: int, m: int) -> None:
        self._parts.setdefault(m, {})[k] = self.actors.handles[k].snapshot.remote(m, self.store)

    def report(self, k: int, m: int, waiting: Any) -> StepReport:
        ref = self._pending.pop((k, m))
        waiting([ref])
        report: StepReport = get(ref, k, m, self.actors.names[k])
        return report

    def parts(self, m: int, waiting: Any) -> list[Part | CheckpointError]:
        refs = self._parts.pop(m)
        waiting(list(refs.values()))
        return [_part(refs[k], k, m, self.actors.names[k]) for k in sorted(refs)]

    def in_flight_parts(self) -> list[Any]:
        return [ref for refs in self._parts.values() for ref in refs.values()]

    def abandon(self) -> None:
        self._outputs.clear()
        self._pending.clear()
        self._parts.clear()

    def reset(self) -> None:
        self.abandon()

    def close(self) -> None:
        self.abandon()


class DirectTransport(ObjectStoreTransport):
    """Ray Direct Transport between the stages (module docstring). The driver still makes one call per stage
    step, as with the object store, and one more for its report; a lost stage breaks the collective group:
    `reset` destroys it and has every stage replaced, and the next `begin` forms a new one."""

    name = "direct"

    def __init__(self, actors: StageActors) -> None:
        super().__init__(actors)
        self._group: Any = None  # the collective group over the current stage actors

    def begin(self, store: CheckpointStore | None) -> None:
        super().begin(store)
        if self._group is None and len(self.actors) > 1:
            from ray.experimental.collective import create_collective_group

            self._group = create_collective_group(list(self.actors.handles), backend=self._backend()[0])

    def _backend(self) -> tuple[str, str]:
        """(collective backend, tensor transport) for the stages' device."""
        return ("nccl", "nccl") if self.actors.gpus else ("torch_gloo", "gloo")

    def step(self, k: int, m: int, frames: np.ndarray | None) -> None:
        h, emit = self.actors.handles[k], k + 1 < len(self.actors)
        x = frames if k == 0 else self._outputs.pop((k - 1, m))
        try:
            if emit:
                self._outputs[(k, m)] = h.step_direct.options(tensor_transport=self._backend()[1]).remote(m, x)
            else:
                h.step_direct.remote(m, x, False)
        except ValueError as e:  # Ray dropped the actor from the group: it kills both ends of a failed transfer
            raise StageLost(k, m, e, self.actors.names[k]) from e
        self._pending[(k, m)] = h.take_report.remote(m)

    def reset(self) -> None:
        """A stage was lost: the group is broken, and every stage actor is killed so that all are replaced.
        A survivor may still hold the old group, or wait on a transfer from the dead stage; and Ray itself
        kills both ends of a failed transfer, up to RAY_rdt_fetch_fail_timeout_milliseconds (60 s) later:
        a fresh set of actors is the one state a new group can be formed over."""
        import ray

        super().reset()
        for h in self.actors.handles:
            ray.kill(h, no_restart=True)
        self._destroy()  # after the kills: a survivor's part of it would wait for the transfer it is stuck in

    def close(self) -> None:
        super().close()
        self._destroy()

    def _destroy(self) -> None:
        group, self._group = self._group, None
        if group is None:
            return
        from ray.experimental.collective import destroy_collective_group

        try:
            destroy_collective_group(group)
        except Exception as e:  # noqa: BLE001 - a group with a dead member may fail to tear down; it is dropped
            logger.debug("destroy collective group: %s", e)


def _part(ref: Any, k: int, m: int, actor: str) -> Part | CheckpointError:
    """Stage k's part of the barrier after m, or why the store refused it (a lost stage still raises)."""
    try:
        part: Part = get(ref, k, m, actor)
        return part
    except CheckpointError as e:
        return e
